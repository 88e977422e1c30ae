//! Fuzz target bodies for Outrider's parsers; see `checks` and `fuzz/README.md`.

pub mod checks;
