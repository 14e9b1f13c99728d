//! The pure core: gateways, keys, secrets, management tokens and the Check decision.
//! No transport and no storage code lives here.

pub mod access;
pub mod asked;
pub mod budget;
pub mod check;
pub mod clock;
pub mod counters;
pub mod estimate;
pub mod gateway;
pub mod key;
pub mod metering;
pub mod money;
pub mod period;
pub mod pricing;
pub mod request;
pub mod secret;
pub mod shards;
pub mod tokens;
pub mod usage;
pub mod view;
pub mod window;

use std::fmt;

/// Bad input, named by the field it came in and the rule it broke. The message is a
/// fixed string: a rejected value (often a secret pasted in the wrong field) can never
/// reach an error message, the audit trail or the log through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: &'static str,
}

impl FieldError {
    pub fn new(field: &'static str, message: &'static str) -> Self {
        FieldError { field, message }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}
