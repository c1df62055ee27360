use super::*;
use serde_json::json;

#[test]
fn unsupported_keywords_are_named() {
    let e = Grammar::from_schema(
        &json!({"type":"object","properties":{"a":{"type":"string","pattern":"x"}}}),
    )
    .unwrap_err();
    assert_eq!(e.path, "/properties/a/pattern");
    assert!(e.message.contains("pattern"));
    let e = Grammar::from_schema(&json!({"type":"object","patternProperties":{}})).unwrap_err();
    assert!(e.message.contains("patternProperties"));
    let e = Grammar::from_schema(&json!({"oneOf":[{"type":"string"}]})).unwrap_err();
    assert!(e.message.contains("oneOf"));
    let e = Grammar::from_schema(&json!({"$ref":"http://x/y"})).unwrap_err();
    assert!(e.message.contains("$ref"));
    let e = Grammar::from_schema(&json!({"$defs":{"A":{"$ref":"#/$defs/A"}},"$ref":"#/$defs/A"}))
        .unwrap_err();
    assert!(e.message.contains("cycle"), "{e}");
}

#[test]
fn recursive_refs_compile() {
    let g = Grammar::from_schema(&json!({
        "$defs": {"node": {"type":"object","properties":{"kids":{"type":"array","items":{"$ref":"#/$defs/node"}}}}},
        "$ref": "#/$defs/node"
    }))
    .unwrap();
    assert!(g.nodes.len() > 3);
}
