//! Helpers for the black-box tests in `tests/tests/`: start the real
//! `smarthost` binary on free loopback ports and talk to it over sockets.
