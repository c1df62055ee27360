//! Request bodies through the same parse → validate → template steps the handlers run
//! before anything reaches the engine. Any input must give Ok or an OpenAI-shaped 4xx.
#![no_main]

use std::sync::OnceLock;

use candela::api::error::{parse, ApiError};
use candela::api::types::{ChatRequest, CommonParams, CompletionRequest};
use candela::api::validate;
use candela::engine::text::template::{ChatTemplate, CHATML};
use libfuzzer_sys::fuzz_target;

fn template() -> &'static ChatTemplate {
    static T: OnceLock<ChatTemplate> = OnceLock::new();
    T.get_or_init(|| ChatTemplate::new(CHATML, "<s>", "</s>").unwrap())
}

fn client_error(e: ApiError) {
    assert!(e.status.is_client_error(), "{} for {}", e.status, e.message);
    let _ = axum::response::IntoResponse::into_response(e);
}

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    match parse::<CommonParams>(&v) {
        Ok(common) => {
            if let Err(e) = validate::check_common(&common, Some(5), 49_152) {
                client_error(e);
            }
            if let Err(e) = validate::session_key(common.prompt_cache_key.as_deref(), None) {
                client_error(e);
            }
        }
        Err(e) => client_error(e),
    }
    match parse::<ChatRequest>(&v) {
        Ok(chat) => match validate::template_messages(&chat.messages) {
            Ok(msgs) => {
                let _ = template().render(&msgs, None, true);
            }
            Err(e) => client_error(e),
        },
        Err(e) => client_error(e),
    }
    if let Err(e) = parse::<CompletionRequest>(&v) {
        client_error(e);
    }
});
