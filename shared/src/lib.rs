//! Domain types shared by the cutover coordinator and agent: the plan file's model and
//! its validation, durations, names and the masking of secret values. No IO beyond parsing text, no async runtime.

pub mod clock;
pub mod duration;
pub mod errors;
pub mod exposition;
pub mod names;
pub mod placeholders;
pub mod plan;
pub mod secrets;
pub mod signing;
pub mod size;
pub mod token;

pub use duration::Duration;
