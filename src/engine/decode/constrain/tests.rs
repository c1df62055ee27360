//! Unit tests of the automaton on small synthetic vocabularies.

use super::*;
use crate::engine::decode::grammar::Grammar;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const EOS: u32 = 0;

/// A vocabulary of every printable ASCII byte, some UTF-8 and JSON-ish multi-byte
/// tokens (id 0 is EOS).
fn vocab() -> (TokenTable, Vec<Vec<u8>>) {
    let mut toks: Vec<Vec<u8>> = vec![b"<eos>".to_vec()];
    for c in 0x20u8..0x7F {
        toks.push(vec![c]);
    }
    for t in [
        "\n",
        "\t",
        "{\"",
        "\":",
        "\",",
        "\"}",
        "\": \"",
        "true",
        "false",
        "null",
        "12",
        "3.5",
        "e+",
        "name",
        "city",
        "\"name\"",
        "\"age\":",
        "é",
        "日本",
        "\\n",
        "\\u00e9",
        "\\u",
        "\"]",
        "],",
        "}}",
        "<tool_call>",
        "</tool_call>",
        "<tool",
        "_call>",
        "\n<",
        "  ",
        "ab\"c",
        "x\",",
        "é\"}",
        "ab\\\"",
        "\"\n",
    ] {
        toks.push(t.as_bytes().to_vec());
    }
    toks.push(vec![0xE6]); // a lone UTF-8 lead byte (byte-fallback token)
    toks.push(vec![0x97, 0xA5]);
    let table = TokenTable::new(
        toks.iter()
            .enumerate()
            .map(|(i, t)| (i != 0).then(|| t.clone()))
            .collect(),
        vec![EOS],
    );
    (table, toks)
}

/// Sample uniformly among allowed tokens until EOS (or `limit` tokens).
fn walk(g: &Grammar, seed: u64, limit: usize) -> Option<Vec<u8>> {
    let (table, toks) = vocab();
    let mut c = Constraint::new(Arc::new(g.clone()));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for _ in 0..limit {
        let allowed: Vec<u32> = c
            .allowed(&table)
            .iter()
            .enumerate()
            .filter(|(_, &a)| a)
            .map(|(i, _)| i as u32)
            .collect();
        assert!(
            !allowed.is_empty(),
            "dead end after {:?}",
            String::from_utf8_lossy(&out)
        );
        // Prefer ending (and structure) now and then so walks finish.
        let id = if allowed.contains(&EOS) && rng.gen_bool(0.5) {
            EOS
        } else {
            allowed[rng.gen_range(0..allowed.len())]
        };
        assert!(c.advance(&table, id));
        if id == EOS {
            return Some(out);
        }
        out.extend_from_slice(&toks[id as usize]);
    }
    None
}

fn json_walks(g: &Grammar, n: u64) -> Vec<Value> {
    let mut done = Vec::new();
    for seed in 0..n {
        if let Some(bytes) = walk(g, seed, 400) {
            let v: Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&bytes)));
            done.push(v);
        }
    }
    done
}

#[test]
fn json_object_walks_always_parse() {
    let vals = json_walks(&Grammar::json_object(), 200);
    assert!(vals.len() > 20, "only {} walks finished", vals.len());
    assert!(vals.iter().all(|v| v.is_object()));
}

#[test]
fn schema_walks_follow_the_schema() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", 3]}, "minItems": 1, "maxItems": 2},
            "ok": {"type": ["boolean", "null"]}
        },
        "required": ["name", "age"],
        "additionalProperties": false
    });
    let g = Grammar::from_schema(&schema).unwrap();
    let vals = json_walks(&g, 300);
    assert!(vals.len() > 20, "only {} walks finished", vals.len());
    for v in vals {
        let o = v.as_object().unwrap();
        assert!(o["name"].as_str().unwrap().chars().count() <= 5, "{v}");
        assert!(o["age"].is_i64() || o["age"].is_u64(), "{v}");
        for k in o.keys() {
            assert!(["name", "age", "tags", "ok"].contains(&k.as_str()), "{v}");
        }
        if let Some(t) = o.get("tags") {
            let t = t.as_array().unwrap();
            assert!((1..=2).contains(&t.len()), "{v}");
            assert!(t
                .iter()
                .all(|x| *x == json!("a") || *x == json!("b") || *x == json!(3)));
        }
        if let Some(b) = o.get("ok") {
            assert!(b.is_boolean() || b.is_null(), "{v}");
        }
    }
}

#[test]
fn exact_texts() {
    let g = Arc::new(
        Grammar::from_schema(
            &json!({"type":"object","properties":{"a":{"type":"number"}},"required":["a"]}),
        )
        .unwrap(),
    );
    let c = Constraint::new(g.clone());
    assert!(c.accepts_text(b"{\"a\": -1.5e+3}"));
    assert!(c.accepts_text(b"{ \"a\" : 0 }"));
    assert!(!c.accepts_text(b"{}"));
    assert!(!c.accepts_text(b"{\"a\": 01}"));
    assert!(!c.accepts_text(b"{\"b\": 1}"));
    assert!(!c.accepts_text(b"{\"a\": 1,}"));
    let s = Arc::new(Grammar::from_schema(&json!({"type":"string","minLength":2})).unwrap());
    let c = Constraint::new(s);
    assert!(c.accepts_text(b"\"a\\\"\""));
    assert!(!c.accepts_text(b"\"a\""));
    assert!(!c.accepts_text(b"\"a\nb\""));
    assert!(!c.accepts_text(b"\"\\ud83d\""));
}

#[test]
fn end_only_when_complete_and_control_tokens_never() {
    let (table, _) = vocab();
    let mut c = Constraint::new(Arc::new(Grammar::json_object()));
    assert!(!c.allowed(&table)[EOS as usize]);
    let open = 1 + (b'{' - 0x20) as u32;
    let close = 1 + (b'}' - 0x20) as u32;
    assert!(c.advance(&table, open));
    assert!(!c.allowed(&table)[EOS as usize]);
    assert!(c.advance(&table, close));
    let a = c.allowed(&table);
    assert!(a[EOS as usize]);
    assert_eq!(
        a.iter().filter(|&&x| x).count(),
        1,
        "only EOS after the object"
    );
}

#[test]
fn tool_calls_grammar() {
    let tools = vec![
        (
            "get_weather".to_string(),
            json!({"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}),
        ),
        (
            "noop".to_string(),
            json!({"type":"object","properties":{},"additionalProperties":false}),
        ),
    ];
    let g = Arc::new(Grammar::tool_calls(&tools, 2).unwrap());
    let c = Constraint::new(g.clone());
    assert!(c.accepts_text(b"<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"));
    assert!(!c.accepts_text(b"<tool_call>\n{\"name\": \"other\""));
    assert!(!c.accepts_text(b"<tool_call>{\"name\": \"noop\", \"arguments\": {\"x\": 1}}"));
    let two = b"<tool_call>{\"name\":\"noop\",\"arguments\":{}}</tool_call>\n<tool_call>{\"name\":\"noop\",\"arguments\":{}}</tool_call>";
    assert!(c.accepts_text(two));
    let mut three = two.to_vec();
    three.extend_from_slice(b"<");
    assert!(!c.accepts_text(&three), "max_calls = 2");
    for seed in 0..100 {
        if let Some(out) = walk(&g, seed, 300) {
            let s = String::from_utf8(out).unwrap();
            // The JSON may itself contain "</tool_call>" inside a string: read one value.
            let inner = s.split_once("<tool_call>").unwrap().1;
            let v: Value = serde_json::Deserializer::from_str(inner)
                .into_iter::<Value>()
                .next()
                .unwrap()
                .unwrap();
            assert!(v["name"] == "get_weather" || v["name"] == "noop", "{v}");
        }
    }
}

#[test]
fn recursive_schema_walks() {
    let g = Grammar::from_schema(&json!({
        "$defs": {"n": {"type":"object","properties":{"v":{"type":"integer"},"kids":{"type":"array","items":{"$ref":"#/$defs/n"},"maxItems":2}},"required":["v"]}},
        "$ref": "#/$defs/n"
    }))
    .unwrap();
    let vals = json_walks(&g, 100);
    assert!(!vals.is_empty());
    fn check(v: &Value) {
        assert!(v["v"].is_i64() || v["v"].is_u64(), "{v}");
        if let Some(k) = v.get("kids") {
            k.as_array().unwrap().iter().for_each(check);
        }
    }
    vals.iter().for_each(check);
}

#[test]
fn fast_mask_equals_brute_force() {
    let (table, toks) = vocab();
    let grammars = [
        Grammar::json_object(),
        Grammar::from_schema(&json!({"type":"object","properties":{
            "s":{"type":"string","maxLength":3},"n":{"type":["integer","null"]},
            "e":{"enum":["ab","a\"c", 1]}},"required":["s"]}))
        .unwrap(),
        Grammar::from_schema(&json!({"type":"object","properties":{
            "a":{"type":"string","minLength":2},"b":{"type":"array","items":{"type":"string"}},
            "c":{"type":"string","minLength":1,"maxLength":6}},"required":["a","b","c"]}))
        .unwrap(),
        Grammar::tool_calls(
            &[(
                "f".into(),
                json!({"type":"object","properties":{"x":{"type":"string"}}}),
            )],
            2,
        )
        .unwrap(),
    ];
    for g in grammars {
        let g = Arc::new(g);
        for seed in 0..30 {
            let mut c = Constraint::new(g.clone());
            let mut rng = StdRng::seed_from_u64(seed);
            for _ in 0..60 {
                let fast: Vec<bool> = c.allowed(&table).to_vec();
                for (id, t) in toks.iter().enumerate().skip(1) {
                    assert_eq!(
                        fast[id],
                        c.accepts_text(t),
                        "token {:?}",
                        String::from_utf8_lossy(t)
                    );
                }
                assert_eq!(fast[EOS as usize], c.can_end());
                let ok: Vec<usize> = (1..toks.len()).filter(|&i| fast[i]).collect();
                if ok.is_empty() {
                    break;
                }
                assert!(c.advance(&table, ok[rng.gen_range(0..ok.len())] as u32));
            }
        }
    }
}
