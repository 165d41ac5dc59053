//! The embedded local spool: a crash-safe journal in one directory.
