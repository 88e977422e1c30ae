//! Host keys pinned by fingerprint: what `hostKeyPolicy: AcceptNew` trusted on first use.
//! A pin is checked after `known_hosts`: a key the Secret's `known_hosts` does not know is
//! trusted when it matches the host's pin and refused as a mismatch when it does not, so a
//! host whose key was pinned can never be trusted "on first use" again with another key.
//!
//! Pins are SHA-256 fingerprints, not whole keys: a 5,000-host fleet's pins take the same
//! few hundred kilobytes whatever the key types (a whole RSA key line is ~550 bytes).

use std::collections::HashMap;

use russh::keys::PublicKey;

use super::known_hosts;

/// One pinned host key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pin {
    /// The Inventory host name (for messages and pruning; the lookup is by address and port).
    pub host: String,
    pub address: String,
    pub port: u16,
    /// `SHA256:…`, as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
}

/// Why a pin list cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct PinsError {
    pub line: usize,
    pub message: String,
}

/// The verdict of a pin list on a presented key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinVerdict {
    Unpinned,
    Matches,
    Differs { pinned: String },
}

/// Pinned fingerprints by `(address, port)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pins {
    by_target: HashMap<(String, u16), Pin>,
}

impl Pins {
    pub fn new(pins: impl IntoIterator<Item = Pin>) -> Self {
        Self {
            by_target: pins
                .into_iter()
                .map(|p| ((p.address.to_ascii_lowercase(), p.port), p))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_target.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_target.is_empty()
    }

    /// Every pin, sorted by host name (the stored order).
    pub fn sorted(&self) -> Vec<Pin> {
        let mut all: Vec<Pin> = self.by_target.values().cloned().collect();
        all.sort();
        all
    }

    pub fn insert(&mut self, pin: Pin) {
        self.by_target
            .insert((pin.address.to_ascii_lowercase(), pin.port), pin);
    }

    /// Keeps only the pins `keep` accepts (e.g. hosts still listed at the same address).
    pub fn retain(&mut self, mut keep: impl FnMut(&Pin) -> bool) {
        self.by_target.retain(|_, p| keep(p));
    }

    pub fn verify(&self, address: &str, port: u16, key: &PublicKey) -> PinVerdict {
        self.verify_fingerprint(address, port, &known_hosts::fingerprint(key))
    }

    pub fn verify_fingerprint(&self, address: &str, port: u16, fingerprint: &str) -> PinVerdict {
        match self.by_target.get(&(address.to_ascii_lowercase(), port)) {
            None => PinVerdict::Unpinned,
            Some(p) if p.fingerprint == fingerprint => PinVerdict::Matches,
            Some(p) => PinVerdict::Differs {
                pinned: p.fingerprint.clone(),
            },
        }
    }

    /// The stored text form: one `host address port fingerprint` line per pin, sorted.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for p in self.sorted() {
            out.push_str(&format!(
                "{} {} {} {}\n",
                p.host, p.address, p.port, p.fingerprint
            ));
        }
        out
    }

    /// One pin from its stored map entry: host name → `address port fingerprint`.
    pub fn parse_entry(host: &str, value: &str) -> Result<Pin, PinsError> {
        Self::parse(&format!("{host} {value}"))?
            .by_target
            .into_values()
            .next()
            .ok_or(PinsError {
                line: 1,
                message: "empty".into(),
            })
    }

    /// The stored map entry of a pin (see [`Pins::parse_entry`]).
    pub fn entry(pin: &Pin) -> (String, String) {
        (
            pin.host.clone(),
            format!("{} {} {}", pin.address, pin.port, pin.fingerprint),
        )
    }

    /// Parses [`Pins::to_text`]'s form; blank lines and `#` comments are ignored.
    pub fn parse(text: &str) -> Result<Pins, PinsError> {
        let mut pins = Pins::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: &str| PinsError {
                line: i + 1,
                message: message.to_string(),
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [host, address, port, fingerprint] = fields[..] else {
                return Err(bad("expected `host address port SHA256:fingerprint`"));
            };
            let port: u16 = port.parse().map_err(|_| bad("port is not a number"))?;
            if !fingerprint.starts_with("SHA256:") {
                return Err(bad("fingerprint must start with SHA256:"));
            }
            pins.insert(Pin {
                host: host.to_string(),
                address: address.to_string(),
                port,
                fingerprint: fingerprint.to_string(),
            });
        }
        Ok(pins)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(host: &str, addr: &str, port: u16, fp: &str) -> Pin {
        Pin {
            host: host.into(),
            address: addr.into(),
            port,
            fingerprint: fp.into(),
        }
    }

    #[test]
    fn text_form_round_trips_sorted_and_rejects_garbage() {
        let pins = Pins::new([
            pin("b", "127.0.0.2", 22, "SHA256:bbb"),
            pin("a", "Host.Example", 2222, "SHA256:aaa"),
        ]);
        let text = pins.to_text();
        assert_eq!(
            text,
            "a Host.Example 2222 SHA256:aaa\nb 127.0.0.2 22 SHA256:bbb\n"
        );
        assert_eq!(Pins::parse(&text).unwrap(), pins);
        assert!(Pins::parse("a 1.2.3.4 x SHA256:a").is_err());
        assert!(Pins::parse("a 1.2.3.4 22 MD5:aa").is_err());
        assert!(Pins::parse("a 1.2.3.4 22").is_err());
    }

    #[test]
    fn a_pin_matches_only_its_address_and_port_and_flags_another_key() {
        let pins = Pins::new([pin("a", "host.example", 22, "SHA256:aaa")]);
        assert_eq!(
            pins.verify_fingerprint("HOST.example", 22, "SHA256:aaa"),
            PinVerdict::Matches
        );
        assert_eq!(
            pins.verify_fingerprint("host.example", 22, "SHA256:zzz"),
            PinVerdict::Differs {
                pinned: "SHA256:aaa".into()
            }
        );
        assert_eq!(
            pins.verify_fingerprint("host.example", 2222, "SHA256:zzz"),
            PinVerdict::Unpinned
        );
    }
}
