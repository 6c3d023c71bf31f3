//! Job states as every side names and groups them.

use crate::v1::JobState;

/// The word `bridge ps` and the messages use for a state.
pub fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Unspecified => "unknown",
        JobState::Queued => "queued",
        JobState::Setup => "setup",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Lost => "lost",
    }
}

/// The job has ended: its log is complete and its state final.
pub fn is_terminal(s: JobState) -> bool {
    matches!(
        s,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
    )
}
