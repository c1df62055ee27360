//! The served models: one [`Engine`] per configured model (its own worker thread,
//! weights and session KV store), and the routing of a request's `model` field to one
//! of them. The first configured model is the default.

use crate::engine::{fetch, Engine, EngineState};

use super::error::ApiError;

/// One configured model under the name it is served as.
#[derive(Clone)]
pub struct Served {
    pub id: String,
    pub engine: Engine,
}

/// Every model this server holds, in configuration order (never empty).
#[derive(Clone)]
pub struct Models {
    /// The default model, also `list[0]`.
    default: Served,
    list: Vec<Served>,
}

impl Models {
    /// `list` must not be empty; the first entry is the default model.
    pub fn new(list: Vec<Served>) -> Option<Self> {
        let default = list.first()?.clone();
        Some(Self { default, list })
    }

    pub fn all(&self) -> &[Served] {
        &self.list
    }

    /// The default (first) model.
    pub fn first(&self) -> &Served {
        &self.default
    }

    /// The model a request names. No name, `""` and `"default"` mean the first model;
    /// otherwise the served id, one of a known model's aliases, or the GGUF file name.
    /// Anything else is a 404 `model_not_found`, as OpenAI answers.
    pub fn pick(&self, requested: Option<&str>) -> Result<&Served, ApiError> {
        let name = match requested.map(str::trim) {
            None | Some("") => return Ok(self.first()),
            Some(n) if n.eq_ignore_ascii_case("default") => return Ok(self.first()),
            Some(n) => n,
        };
        self.list
            .iter()
            .find(|s| s.id == name)
            .or_else(|| {
                let known = fetch::known_model(name)?;
                self.list.iter().find(|s| s.id == known.id)
            })
            .or_else(|| {
                self.list.iter().find(|s| match s.engine.state() {
                    EngineState::Ready(l) => l
                        .info
                        .path
                        .file_name()
                        .is_some_and(|f| f.to_string_lossy() == name),
                    _ => false,
                })
            })
            .ok_or_else(|| ApiError::model_not_found(name, &self.ids().join("`, `")))
    }

    pub fn ids(&self) -> Vec<String> {
        self.list.iter().map(|s| s.id.clone()).collect()
    }
}
