//! One module per command.

pub mod daemon;
pub mod down;
pub mod status;
pub mod sync;
pub mod up;
