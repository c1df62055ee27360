//! The OpenAI-shaped bodies of the HTTP API, typed once: the handlers parse
//! [`request`] types and serialize [`response`] types, and the OpenAPI document
//! (`super::openapi`) is generated from these same types, so the two cannot drift.

pub mod request;
pub mod response;

pub use request::*;
pub use response::*;
