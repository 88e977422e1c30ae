# Outrider — everything a fresh machine needs goes through these targets.
SHELL := /bin/bash
KUBECTL := e2e/bin/kubectl --kubeconfig e2e/.cluster/kubeconfig
CARGO ?= cargo

.PHONY: all deps tools build crds lint test unit e2e cluster-up cluster-down demo demo-down clean-cluster bench-ssh bench-plan bench-health bench-agent bench-policy

all: build

## deps: Debian packages the tests need (idempotent)
deps:
	e2e/deps.sh

## tools: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm
##        built from their Go modules and cached in ~/.cache/outrider (cold ~17 min, then instant)
tools:
	e2e/tools.sh

build:
	$(CARGO) build --locked

## dist: dist/outrider, a static binary (glibc static-pie, checked: no PT_INTERP, no DT_NEEDED)
## image: dist/outrider-<version>.oci.tar, the OCI image (scratch-style, uid 65532), built with
##        go-containerregistry's crane (cached like the other tools), no container engine
.PHONY: dist image
dist:
	e2e/image/dist.sh >/dev/null

image:
	e2e/tools.sh crane
	e2e/image/build.sh >/dev/null

## crds: regenerate crds/ from the types (the test suite fails when they differ)
crds:
	$(CARGO) run --quiet --locked -- crd > crds/outrider.dev.yaml.tmp
	mv crds/outrider.dev.yaml.tmp crds/outrider.dev.yaml
	cp crds/outrider.dev.yaml charts/outrider/crds/outrider.dev.yaml

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

cluster-up: deps tools
	e2e/cluster.sh up

cluster-down:
	e2e/cluster.sh down

## cluster-test: a second cluster up/status/down on saturated cores and with many inherited fds (startup race)
.PHONY: cluster-test
cluster-test: deps tools
	e2e/cluster_test.sh

## test: everything — unit, integration (tests/) and cluster tests (e2e/) on a real control plane
test: deps tools image
	$(CARGO) build --locked --all-targets
	e2e/cluster.sh up
	$(CARGO) test --locked --no-fail-fast

## demo: (root) a fleet of three network-namespace hosts with real sshd (e2e/fleet.sh), the local
##       control plane, controller, node agent and VictoriaLogs; examples/ applied, waited on until
##       every resource is green, then `kubectl get outrider` and what to try
demo: cluster-up build
	e2e/tools.sh victorialogs
	e2e/demo.sh

demo-down:
	e2e/demo.sh down
	e2e/cluster.sh down

## bench-ssh: sshd CPU per connection (200 sequential), then uptime on 500 loopback hosts: outrider vs parallel-ssh vs ansible vs asyncssh
bench-ssh: deps
	e2e/bench/deps.sh
	$(CARGO) build --release --locked
	$(CARGO) bench --locked --bench ssh_fanout

## bench-plan: a 3-stage DeploymentPlan on 500 loopback hosts through the controller vs ansible-playbook
bench-plan: deps tools
	e2e/bench/deps.sh
	e2e/cluster.sh up
	$(CARGO) build --release --locked
	$(CARGO) bench --locked --bench plan_rollout

## bench-health: 1,000 loopback hosts x 5 checks + 1,000 HTTP endpoints every 10 s through the controller vs check_by_ssh
##               (HC_BENCH_HOSTS=1000 HC_BENCH_SECS=300 HC_BENCH_FLAP_SECS=120 shorten it)
bench-health: deps tools
	e2e/bench/deps.sh
	e2e/cluster.sh up
	$(CARGO) build --release --locked
	ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn); $(CARGO) bench --locked --bench health_checks

## bench-agent: 1 GiB of log lines shipped on one core: outrider (HTTP, Loki→VictoriaLogs) vs rsyslog
bench-agent: deps
	e2e/bench/deps.sh
	e2e/tools.sh victorialogs
	$(CARGO) build --release --locked
	$(CARGO) bench --locked --bench agent_throughput

## bench-policy: SecurityPolicy compile of 10,000 rules / 200 zones vs Aerleon, nft -f load in network
##               namespaces (1k-20k rules), commit-confirmed apply to 20 netns hosts (root; ~15 min)
bench-policy: deps
	e2e/bench/deps.sh
	e2e/bench/aerleon_install.sh >/dev/null
	$(CARGO) build --release --locked
	$(CARGO) bench --locked --bench policy

## fuzz: each cargo-fuzz target (fuzz/fuzz_targets/) for FUZZ_SECONDS (default 60) under libFuzzer,
##       starting from fuzz/seeds and fuzz/regressions; needs nightly Rust, installs cargo-fuzz if
##       missing. FUZZ_TARGETS picks targets, FUZZ_FLAGS passes cargo-fuzz options (default: no
##       sanitizer; `-s address` for ASan), OUTRIDER_FUZZ_SHELLS=/path/zsh:... adds shells for
##       `quote`. New inputs go to fuzz/corpus/ (ignored), crashes to fuzz/artifacts/. `make test`
##       replays the seeds and regressions on stable (tests/fuzz_corpus.rs). See fuzz/README.md.
## fuzz-smoke: the same for 10 s per target
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= known_hosts quote duration agent_parse spool
FUZZ_FLAGS ?= --sanitizer none
.PHONY: fuzz fuzz-smoke
fuzz:
	@cargo +nightly --version >/dev/null 2>&1 || { \
		echo "make fuzz needs a nightly Rust toolchain (libFuzzer's instrumentation is nightly-only):" >&2; \
		echo "    rustup toolchain install nightly --profile minimal" >&2; exit 1; }
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install --locked cargo-fuzz
	@failed=""; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t; \
		regressions=""; [ -d fuzz/regressions/$$t ] && regressions=fuzz/regressions/$$t; \
		echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
		cargo +nightly fuzz run $(FUZZ_FLAGS) $$t fuzz/corpus/$$t fuzz/seeds/$$t $$regressions \
			-- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || failed="$$failed $$t"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz targets that failed:$$failed (inputs in fuzz/artifacts/)" >&2; exit 1; fi

fuzz-smoke:
	$(MAKE) fuzz FUZZ_SECONDS=10
