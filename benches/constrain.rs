//! Token-mask time of grammar-constrained decoding on the real vocabularies, without
//! the model: a fixed JSON document (and a forced tool call) is tokenized, then fed
//! token by token through a fresh [`Constraint`], timing `mask` before each token.
//!
//! `cargo bench --bench constrain` (models from `CANDELA_TEST_DATA_DIR`, default
//! /tmp/cdata, as the tests find them). Prints ms per token per vocabulary and grammar.
//! With `CHECK=1` it also compares every mask with feeding every token through the
//! automaton on its own (slow: the whole vocabulary per step).

// Tests and benches may panic on what they do not expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use candela::engine::decode::constrain::{Constraint, TokenTable};
use candela::engine::decode::grammar::Grammar;
use candela::engine::Tok;
use candle_core::quantized::gguf_file;
use serde_json::json;

fn main() {
    let dir = std::env::var("CANDELA_TEST_DATA_DIR").unwrap_or_else(|_| "/tmp/cdata".into());
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let schema = json!({"type": "object", "properties": {
        "title": {"type": "string"}, "summary": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}}, "year": {"type": "integer"}},
        "required": ["title", "summary", "tags", "year"], "additionalProperties": false});
    let doc = "{\"title\": \"The Grand Budapest Hotel\", \"summary\": \"A concierge and his \
               lobby boy are caught up in the theft of a priceless painting and a battle \
               for a family fortune, told with \\\"whimsy\\\" and care.\", \"tags\": \
               [\"comedy\", \"drama\", \"wes anderson\"], \"year\": 2014}";
    let params = json!({"type": "object", "properties": {"title": {"type": "string"},
        "body": {"type": "string"}}, "required": ["title", "body"]});
    let call = "<tool_call>\n{\"name\": \"save_note\", \"arguments\": {\"title\": \
                \"Shopping\", \"body\": \"Milk, eggs, bread and a lot of coffee.\"}}\n</tool_call>";
    let cases = [
        ("json_object", Grammar::json_object(), doc),
        ("json_schema", Grammar::from_schema(&schema).unwrap(), doc),
        (
            "tool_required",
            Grammar::tool_calls(&[("save_note".into(), params)], 1).unwrap(),
            call,
        ),
    ];
    for file in [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ] {
        let path = std::path::Path::new(&dir).join("models").join(file);
        let mut f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let tok = Tok::from_gguf(&ct, None).unwrap();
        let t0 = Instant::now();
        let table = TokenTable::new(tok.token_bytes(), tok.eog.iter().copied().collect());
        let build = t0.elapsed();
        let mut logits = vec![0f32; table.vocab()];
        for (name, g, text) in &cases {
            let ids = tok.encode(text, false).unwrap();
            let g = Arc::new(g.clone());
            if std::env::var("CHECK").is_ok_and(|v| v == "1") {
                let mut c = Constraint::new(g.clone());
                let toks: Vec<Vec<u8>> = tok
                    .token_bytes()
                    .into_iter()
                    .map(Option::unwrap_or_default)
                    .collect();
                let eog: Vec<u32> = tok.eog.iter().copied().collect();
                for &id in &ids {
                    let fast = c.allowed(&table);
                    for (i, b) in toks.iter().enumerate() {
                        let want = if eog.contains(&(i as u32)) {
                            c.can_end()
                        } else {
                            !b.is_empty() && c.accepts_text(b)
                        };
                        assert_eq!(
                            fast[i],
                            want,
                            "{name}: token {i} {:?}",
                            String::from_utf8_lossy(b)
                        );
                    }
                    assert!(c.advance(&table, id));
                }
                println!(
                    "{file:<42} {name:<14} masks equal brute force over {} steps",
                    ids.len()
                );
            }
            let mut best = f64::MAX;
            for _ in 0..reps {
                let mut c = Constraint::new(g.clone());
                let mut spent = 0f64;
                for &id in &ids {
                    logits.fill(0.0);
                    let t = Instant::now();
                    let n = c.mask(&table, &mut logits);
                    spent += t.elapsed().as_secs_f64();
                    assert!(
                        n > 0 && logits[id as usize] == 0.0,
                        "{name}: token {id} masked"
                    );
                    assert!(c.advance(&table, id), "{name}: token {id} refused");
                }
                best = best.min(spent / ids.len() as f64);
            }
            println!(
                "{file:<42} vocab {:>6}  {name:<14} {:>3} tokens  {:.3} ms/token (best of {reps})",
                table.vocab(),
                ids.len(),
                best * 1e3
            );
        }
        println!(
            "{file:<42} token table built in {:.0} ms",
            build.as_secs_f64() * 1e3
        );
    }
}
