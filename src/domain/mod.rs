//! The pure core: gateways, keys, secrets, management tokens and the Check decision.
//! No transport and no storage code lives here.

pub mod access;
pub mod budget;
pub mod check;
pub mod clock;
pub mod estimate;
pub mod gateway;
pub mod key;
pub mod money;
pub mod period;
pub mod pricing;
pub mod secret;
pub mod usage;
pub mod view;
pub mod window;

use std::fmt;

/// Bad input, named by the field it came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        FieldError { field, message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}
