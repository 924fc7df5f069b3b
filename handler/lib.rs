//! lc handler library
