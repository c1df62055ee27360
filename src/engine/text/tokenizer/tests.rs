use super::*;
use serde_json::json;

/// A word-level tokenizer whose post-processor puts `<s>` first, as Llama's does.
fn write_dir(dir: &Path, tokenizer_config: Option<serde_json::Value>) {
    let added = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(0, "<s>"), added(1, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "<unk>",
                  "vocab": {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "<unk>": 4}}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        json!({"eos_token_id": [1, 3]}).to_string(),
    )
    .unwrap();
    if let Some(tc) = tokenizer_config {
        std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    }
}

#[test]
fn hf_dir_bos_eos_from_configs_or_the_post_processor() {
    let config = json!({"bos_token_id": 0, "eos_token_id": 1});
    let d = tempfile::tempdir().unwrap();
    write_dir(d.path(), None);
    let (tok, bos, eos) = Tok::from_hf_dir(d.path(), &config).unwrap();
    assert_eq!((tok.bos_id, tok.eos_id), (Some(0), Some(1)));
    assert_eq!((bos.as_str(), eos.as_str()), ("<s>", "</s>"));
    assert!(tok.add_bos, "the post-processor adds <s>");
    assert_eq!(tok.encode("a b", true).unwrap(), vec![0, 2, 3]);
    assert!(
        tok.eog.contains(&1) && tok.eog.contains(&3),
        "{:?}",
        tok.eog
    );
    // tokenizer_config.json wins: its flag, and its tokens as text or objects.
    let d = tempfile::tempdir().unwrap();
    write_dir(
        d.path(),
        Some(json!({"add_bos_token": false, "bos_token": {"content": "<s>"}, "eos_token": "b"})),
    );
    let (tok, _, eos) = Tok::from_hf_dir(d.path(), &config).unwrap();
    assert!(!tok.add_bos);
    assert_eq!(tok.encode("a b", true).unwrap(), vec![2, 3]);
    assert_eq!((eos.as_str(), tok.eos_id), ("b", Some(3)));
    assert!(
        tok.eog.contains(&1),
        "config.json's eos ends generation too"
    );
    // No tokenizer.json: a clear error.
    let e = Tok::from_hf_dir(tempfile::tempdir().unwrap().path(), &config)
        .err()
        .unwrap();
    assert!(e.to_string().contains("no tokenizer.json"), "{e}");
}
