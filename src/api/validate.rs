//! Turns raw OpenAI request fields into checked engine parameters before anything
//! expensive happens. Every rejection names the parameter and the limit. The costly
//! part of preparing a request (rendering the chat template, tokenizing, compiling a
//! JSON schema into a grammar) runs through [`off_executor`].

use serde_json::Value;

use crate::engine::{SamplingParams, TemplateMessage};

use super::error::ApiError;
use super::types::{ChatMessage, CommonParams, Content};

pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_MESSAGES: usize = 4096;
pub const MAX_STOP_LEN: usize = 256;
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// Checked length + sampling fields.
pub struct Checked {
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// None: as many as the context allows.
    pub max_tokens: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
}

fn range(param: &str, v: Option<f32>, lo: f32, hi: f32, default: f32) -> Result<f32, ApiError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x),
        Some(x) => Err(ApiError::invalid(
            param,
            format!("{param} must be between {lo} and {hi}, got {x}"),
        )),
    }
}

/// Most entries a `logit_bias` map may have.
pub const MAX_LOGIT_BIAS: usize = 1024;

/// OpenAI's `logit_bias`: `{"<token id>": bias}` with bias in [-100, 100], added to the
/// logits before sampling (-100 in effect bans a token, 100 forces it).
pub fn check_logit_bias(v: Option<&Value>, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let map = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(ApiError::invalid(
                "logit_bias",
                "logit_bias must be an object mapping token ids to biases",
            ))
        }
    };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "logit_bias may have at most {MAX_LOGIT_BIAS} entries, got {}",
                map.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (k, b) in map {
        let id: u32 = k.trim().parse().map_err(|_| {
            ApiError::invalid(
                "logit_bias",
                format!("logit_bias key `{k}` is not a token id"),
            )
        })?;
        if id as usize >= vocab {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("logit_bias token id {id} is out of range (vocabulary has {vocab} ids)"),
            ));
        }
        let bias = match b.as_f64() {
            Some(x) if (-100.0..=100.0).contains(&x) => x as f32,
            _ => {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!(
                        "logit_bias value for token {id} must be a number in [-100, 100], got {b}"
                    ),
                ))
            }
        };
        out.push((id, bias));
    }
    Ok(out)
}

pub fn check_common(
    c: &CommonParams,
    logprobs: Option<usize>,
    vocab: usize,
) -> Result<Checked, ApiError> {
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("only n = 1 is supported, got {n}"),
            ));
        }
    }
    let max_tokens = match (c.max_completion_tokens, c.max_tokens) {
        (Some(v), _) => Some(("max_completion_tokens", v)),
        (None, Some(v)) => Some(("max_tokens", v)),
        _ => None,
    };
    let max_tokens = match max_tokens {
        None => None,
        Some((p, v)) if v < 1 => {
            return Err(ApiError::invalid(p, format!("{p} must be >= 1, got {v}")));
        }
        Some((_, v)) => Some(usize::try_from(v).unwrap_or(usize::MAX)),
    };
    let top_k = match c.top_k {
        None => 0,
        Some(k) if k >= 0 => k as usize,
        Some(-1) => 0,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be >= 0 (or -1 for off), got {k}"),
            ))
        }
    };
    let stop = c.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "at most {MAX_STOP_STRINGS} stop strings are allowed, got {}",
                stop.len()
            ),
        ));
    }
    if let Some(s) = stop.iter().find(|s| s.chars().count() > MAX_STOP_LEN) {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "stop strings must be at most {MAX_STOP_LEN} characters, got {}",
                s.chars().count()
            ),
        ));
    }
    let sampling = SamplingParams {
        temperature: range("temperature", c.temperature, 0.0, 2.0, 1.0)?,
        top_p: match range("top_p", c.top_p, 0.0, 1.0, 1.0)? {
            p if p <= 0.0 => return Err(ApiError::invalid("top_p", "top_p must be > 0, got 0")),
            p => p,
        },
        top_k,
        min_p: range("min_p", c.min_p, 0.0, 1.0, 0.0)?,
        seed: c.seed.map(|s| s as u64),
        presence_penalty: range("presence_penalty", c.presence_penalty, -2.0, 2.0, 0.0)?,
        frequency_penalty: range("frequency_penalty", c.frequency_penalty, -2.0, 2.0, 0.0)?,
        repetition_penalty: match range("repetition_penalty", c.repetition_penalty, 0.0, 10.0, 1.0)?
        {
            p if p <= 0.0 => {
                return Err(ApiError::invalid(
                    "repetition_penalty",
                    "repetition_penalty must be > 0, got 0",
                ))
            }
            p => p,
        },
        logprobs,
        logit_bias: check_logit_bias(c.logit_bias.as_ref(), vocab)?,
        ignore_eos: c.ignore_eos.unwrap_or(false),
    };
    Ok(Checked {
        sampling,
        stop,
        max_tokens,
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

/// The session key from `prompt_cache_key` or the `X-Session-Id` header (the body wins).
pub fn session_key(body: Option<&str>, header: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(k) = body.or(header) else {
        return Ok(None);
    };
    let ok = !k.is_empty()
        && k.len() <= 128
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c));
    if !ok {
        return Err(ApiError::invalid(
            "prompt_cache_key",
            "prompt_cache_key must be 1-128 characters of A-Z, a-z, 0-9, '-', '_', '.', ':', '@'",
        ));
    }
    Ok(Some(k.to_string()))
}

/// Final length check against the context: returns the max tokens to generate.
pub fn fit_context(
    prompt_len: usize,
    max_tokens: Option<usize>,
    ctx: usize,
    prompt_param: &str,
) -> Result<usize, ApiError> {
    if prompt_len == 0 {
        return Err(ApiError::invalid(
            prompt_param,
            format!("{prompt_param} must not be empty"),
        ));
    }
    let exceeded = |want: usize| {
        ApiError::invalid(
            prompt_param,
            format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {} tokens \
                 ({prompt_len} in the prompt, {want} for the completion). Please reduce the prompt or max_tokens.",
                prompt_len.saturating_add(want)
            ),
        )
        .with_code("context_length_exceeded")
    };
    match max_tokens {
        Some(m) if prompt_len.saturating_add(m) > ctx => Err(exceeded(m)),
        Some(m) => Ok(m),
        None if prompt_len >= ctx => Err(exceeded(1)),
        None => Ok(ctx - prompt_len),
    }
}

/// Run `prepare` on tokio's blocking pool and wait for it. Rendering a long chat,
/// tokenizing it and compiling a schema take milliseconds of CPU each: on an async
/// worker they would stall every other connection that worker serves.
pub async fn off_executor<T, F>(prepare: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(prepare)
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))?
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// Messages as the chat template sees them.
pub fn template_messages(messages: &[ChatMessage]) -> Result<Vec<TemplateMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must contain at least one message",
        ));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "at most {MAX_MESSAGES} messages are allowed, got {}",
                messages.len()
            ),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("unknown role `{}` (expected one of {})", m.role, ROLES.join(", ")),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut out = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => out.push_str(t),
                            (k, _) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!("content part type `{k}` is not supported (only `text` with a `text` field)"),
                                ))
                            }
                        }
                    }
                    out
                }
            };
            // The developer role is the system role under another name.
            let role = if m.role == "developer" { "system" } else { &m.role };
            Ok(TemplateMessage {
                role: role.to_string(),
                content,
                name: m.name.clone(),
                tool_call_id: m.tool_call_id.clone(),
                tool_calls: m.tool_calls.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_fit() {
        assert_eq!(fit_context(10, Some(5), 100, "prompt").unwrap(), 5);
        assert_eq!(fit_context(10, None, 100, "prompt").unwrap(), 90);
        let e = fit_context(90, Some(20), 100, "messages").unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(fit_context(0, None, 100, "prompt").is_err());
        assert!(fit_context(5, Some(usize::MAX), 100, "prompt").is_err());
    }

    #[test]
    fn common_rejects_out_of_range() {
        let c = CommonParams {
            temperature: Some(3.0),
            ..Default::default()
        };
        assert_eq!(
            check_common(&c, None, 100).err().unwrap().param.as_deref(),
            Some("temperature")
        );
        let c = CommonParams {
            n: Some(2),
            ..Default::default()
        };
        assert_eq!(
            check_common(&c, None, 100).err().unwrap().param.as_deref(),
            Some("n")
        );
        let c = CommonParams {
            max_tokens: Some(-5),
            ..Default::default()
        };
        assert_eq!(
            check_common(&c, None, 100).err().unwrap().param.as_deref(),
            Some("max_tokens")
        );
        let c = CommonParams {
            max_tokens: Some(5),
            max_completion_tokens: Some(7),
            ..Default::default()
        };
        assert_eq!(
            check_common(&c, None, 100).ok().unwrap().max_tokens,
            Some(7)
        );
    }
}
