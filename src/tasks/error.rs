//! Why an image's outputs gave no answer: the one error type of output decoding, in a file
//! of its own so every task imports it without importing the dispatcher (`tasks/mod.rs`).

/// Why an image's outputs gave no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PostprocessError {
    /// The outputs do not fit the model's layout (a server-side fault).
    #[error("{0}")]
    Model(String),
    /// The answer would cost more than a work budget allows (the request's fault).
    #[error("{0}")]
    OverBudget(String),
    /// Nobody waits for the answer any more (deadline passed or client gone).
    #[error("cancelled")]
    Cancelled,
}

impl PostprocessError {
    /// A fault of the model's outputs (said explicitly: a `?` on a string is not one).
    pub fn model(why: impl Into<String>) -> Self {
        PostprocessError::Model(why.into())
    }
}
