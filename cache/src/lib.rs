//! lc cache engine
