//! One module per command.

pub mod cancel;
pub mod daemon;
pub mod down;
pub mod exec;
pub mod forward;
pub mod kernel;
pub mod logs;
pub mod ps;
pub mod pull;
pub mod run;
pub mod status;
pub mod sweep;
pub mod sync;
pub mod up;
