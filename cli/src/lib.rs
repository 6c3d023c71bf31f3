//! The part of `bridge` other programs build on: the job file's parser
//! ([`spec`]), which the fuzz targets (`fuzz/`) drive with arbitrary text.
//! The command itself is `main.rs`.

pub mod spec;
