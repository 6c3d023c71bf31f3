//! One module per command.

pub mod cancel;
pub mod completions;
pub mod daemon;
pub mod doctor;
pub mod down;
pub mod exec;
pub mod forward;
pub mod gpus;
pub mod kernel;
pub mod logs;
pub mod ps;
pub mod pull;
pub mod run;
pub mod status;
pub mod sweep;
pub mod sync;
pub mod up;
