//! Chat templates: the model's own Jinja template (GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`) rendered with minijinja under Hugging Face semantics
//! (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools`).

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::Serialize;

use crate::engine::EngineError;

/// ChatML, used when a model ships no template.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Gemma's turn format (`<start_of_turn>user … <end_of_turn>`, the assistant as
/// `model`, a system message folded into the first user turn), for Gemma files that ship
/// no template.
pub const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}{% for message in turns %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + (message['content'] | trim) + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// The template for a model that ships none: its family's format, else ChatML.
pub fn fallback(arch: &str) -> &'static str {
    if arch.starts_with("gemma") {
        GEMMA
    } else {
        CHATML
    }
}

/// One message as the template sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
}

/// Instructions one render may execute (a 4,096-message chat needs well under 1%).
pub const TEMPLATE_FUEL: u64 = 50_000_000;

/// The chat template a Hugging Face directory ships: `chat_template` of
/// `tokenizer_config.json` (a string, or a list of named templates of which `default`
/// or else the first is taken), else a `chat_template.jinja` file.
pub fn hf_template(tokenizer_config: &serde_json::Value, dir: &std::path::Path) -> Option<String> {
    match &tokenizer_config["chat_template"] {
        serde_json::Value::String(s) => return Some(s.clone()),
        serde_json::Value::Array(list) => {
            let pick = list
                .iter()
                .find(|t| t["name"] == "default")
                .or_else(|| list.first());
            if let Some(t) = pick.and_then(|t| t["template"].as_str()) {
                return Some(t.to_string());
            }
        }
        _ => {}
    }
    std::fs::read_to_string(dir.join("chat_template.jinja")).ok()
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    handles_tools: bool,
}

fn raise_exception(msg: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> String {
    // Templates use this for a "today is" line; UTC date is close enough for a local server.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    fmt.replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", MONTHS[(m as usize - 1) % 12])
        .replace("%b", &MONTHS[(m as usize - 1) % 12][..3])
}

/// `tojson` as transformers defines it for chat templates: Python's `json.dumps` with
/// `ensure_ascii=False` — `", "` and `": "` separators, keys in insertion order, no HTML
/// escaping (minijinja's built-in is compact and escapes `<`, `>`, `&`, `'`). Models
/// were trained on prompts rendered this way, e.g. Qwen's tool signatures.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    if sort_keys.unwrap_or(false) {
        sort_json_keys(&mut json);
    }
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&pad),
            );
            serde::Serialize::serialize(&json, &mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
            serde::Serialize::serialize(&json, &mut ser)
        }
    };
    written.map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    // Safe: the output is JSON, and the template must not escape it again.
    Ok(Value::from_safe_string(
        String::from_utf8(out).unwrap_or_default(),
    ))
}

fn sort_json_keys(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.sort_keys();
            m.values_mut().for_each(sort_json_keys);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(sort_json_keys),
        _ => {}
    }
}

/// Python's default `json.dumps` separators: `", "` between items, `": "` after keys.
struct PyFormatter;

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        // Templates come from model files: bound the work one render may do, so a
        // hostile or broken template fails instead of spinning.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| EngineError::Load(format!("chat template does not parse: {e}")))?;
        Ok(Self {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
            // HF templates that render tools read the `tools` variable.
            handles_tools: source.contains("tools"),
        })
    }

    /// Whether the template renders `tools` (and tool turns) itself.
    pub fn handles_tools(&self) -> bool {
        self.handles_tools
    }

    /// Render a conversation into the prompt text.
    pub fn render(
        &self,
        messages: &[TemplateMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        })
        .map_err(|e| EngineError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> TemplateMessage {
        TemplateMessage {
            role: role.into(),
            content: content.into(),
            name: None,
            tool_call_id: None,
            tool_calls: None,
        }
    }

    #[test]
    fn endless_template_runs_out_of_fuel() {
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let e = t.render(&[msg("user", "hi")], None, true).unwrap_err();
        assert!(e.to_string().contains("fuel"), "{e}");
    }

    #[test]
    fn chatml_renders_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let out = t.render(&[msg("user", "hi")], None, true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn gemma_turns_fold_the_system_message_into_the_first_user_turn() {
        let t = ChatTemplate::new(fallback("gemma3"), "<bos>", "<eos>").unwrap();
        let out = t
            .render(
                &[
                    msg("system", "Be brief."),
                    msg("user", " hi "),
                    msg("assistant", "Hello."),
                    msg("user", "Bye"),
                ],
                None,
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(fallback("qwen3"), CHATML);
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let err = t.render(&[msg("assistant", "x")], None, true).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn hf_template_is_the_string_the_default_of_a_list_or_the_jinja_file() {
        use serde_json::json;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(hf_template(&json!({"chat_template": "A"}), d).unwrap(), "A");
        let list = json!({"chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"}
        ]});
        assert_eq!(hf_template(&list, d).unwrap(), "D");
        let list = json!({"chat_template": [{"name": "rag", "template": "R"}]});
        assert_eq!(hf_template(&list, d).unwrap(), "R");
        assert_eq!(hf_template(&json!({}), d), None);
        std::fs::write(d.join("chat_template.jinja"), "J").unwrap();
        assert_eq!(hf_template(&json!({}), d).unwrap(), "J");
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip() }}", "", "").unwrap();
        assert_eq!(t.render(&[msg("user", "  x  ")], None, false).unwrap(), "x");
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let t = ChatTemplate::new(
            "{{ messages[0].tool_calls | tojson }}|{{ messages[0].tool_calls | tojson(indent=2) }}",
            "",
            "",
        )
        .unwrap();
        let mut m = msg("assistant", "");
        m.tool_calls = Some(serde_json::json!({"z": 1, "a": ["<b>", "é"], "m": {}}));
        let out = t.render(&[m], None, false).unwrap();
        assert_eq!(
            out,
            "{\"z\": 1, \"a\": [\"<b>\", \"é\"], \"m\": {}}|{\n  \"z\": 1,\n  \"a\": [\n    \"<b>\",\n    \"é\"\n  ],\n  \"m\": {}\n}"
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_418), (2025, 11, 26));
    }
}
