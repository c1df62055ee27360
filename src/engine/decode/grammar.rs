//! JSON grammars for constrained decoding: a JSON Schema (the subset below) compiled
//! into a graph of nodes that [`super::constrain`] walks byte by byte.
//!
//! Supported: `type` (one or a list of `object`, `array`, `string`, `number`,
//! `integer`, `boolean`, `null`), `properties`, `required`, `additionalProperties`
//! (`false`, `true`, or a schema when there are no `properties`), `items`, `minItems`,
//! `maxItems`, `minLength`, `maxLength`, `enum`, `const`, `anyOf`, a one-element
//! `allOf`, `$ref` to `#`, `#/$defs/…` or `#/definitions/…` (recursion included),
//! `true` as a schema, and annotations (`title`, `description`, `default`, `examples`,
//! `$schema`, `$id`, `$comment`, `format` is NOT an annotation here). Anything else —
//! `pattern`, `patternProperties`, `minimum`, `oneOf`, `format`, … — is an error that
//! names the keyword, so a request never gets output that silently ignores part of its
//! schema.
//!
//! Objects are generated with their declared properties in declaration order; optional
//! ones may be left out. With `properties`, no other keys are generated (every such
//! output is valid whether or not `additionalProperties` allows more).
//!
//! Depends on nothing else in the crate.

use serde_json::Value;

pub type NodeId = usize;

/// Node ids every grammar has.
pub const ANY: NodeId = 0;
pub const ANY_OBJECT: NodeId = 1;
pub const ANY_ARRAY: NodeId = 2;

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// Any JSON value.
    Any,
    Null,
    Bool,
    Number {
        integer: bool,
    },
    String {
        min: u32,
        max: u32,
    },
    /// One of these exact JSON texts (compact), from `enum` / `const`.
    Literal(Vec<Vec<u8>>),
    Array {
        items: NodeId,
        min: u32,
        max: u32,
    },
    /// Declared properties in order; `extra` (only without properties): free keys
    /// whose values follow that node.
    Object {
        props: Vec<Prop>,
        extra: Option<NodeId>,
    },
    AnyOf(Vec<NodeId>),
    /// One or more `<tool_call>JSON</tool_call>` blocks (at most `max`), then the end.
    Calls {
        call: NodeId,
        max: u32,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Prop {
    /// The key as JSON text, quotes included.
    pub key: Vec<u8>,
    pub value: NodeId,
    pub required: bool,
}

/// A schema feature we cannot honour, with where it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} (at {path})")]
pub struct SchemaError {
    /// JSON pointer-ish path inside the schema, e.g. `/properties/age/minimum`.
    pub path: String,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Grammar {
    pub nodes: Vec<Node>,
    pub root: NodeId,
}

const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "definitions",
    "deprecated",
    "readOnly",
    "writeOnly",
    "strict",
];

/// Limits that keep the automaton small.
const MAX_NODES: usize = 4096;
const MAX_ENUM: usize = 256;

impl Grammar {
    fn base() -> Self {
        Self {
            nodes: vec![
                Node::Any,
                Node::Object {
                    props: vec![],
                    extra: Some(ANY),
                },
                Node::Array {
                    items: ANY,
                    min: 0,
                    max: u32::MAX,
                },
            ],
            root: ANY,
        }
    }

    /// Any JSON object (`response_format: json_object`).
    pub fn json_object() -> Self {
        let mut g = Self::base();
        g.root = ANY_OBJECT;
        g
    }

    /// A compiled JSON Schema.
    pub fn from_schema(schema: &Value) -> Result<Self, SchemaError> {
        let mut g = Self::base();
        let mut c = Compiler {
            g: &mut g,
            root: schema,
            refs: Vec::new(),
        };
        let root = c.compile(schema, "")?;
        g.root = root;
        g.check_cycles()?;
        Ok(g)
    }

    /// Tool calls: each call is `{"name": <one of the tools>, "arguments": <its
    /// parameters>}` wrapped in `<tool_call>…</tool_call>`; at most `max_calls`.
    pub fn tool_calls(tools: &[(String, Value)], max_calls: u32) -> Result<Self, SchemaError> {
        let mut g = Self::base();
        let mut alts = Vec::new();
        for (i, (name, params)) in tools.iter().enumerate() {
            let mut c = Compiler {
                g: &mut g,
                root: params,
                refs: Vec::new(),
            };
            let args = c.compile(params, &format!("tools[{i}].function.parameters"))?;
            let name_lit = g.push(Node::Literal(vec![json_bytes(&Value::from(name.as_str()))]));
            let call = g.push(Node::Object {
                props: vec![
                    Prop {
                        key: b"\"name\"".to_vec(),
                        value: name_lit,
                        required: true,
                    },
                    Prop {
                        key: b"\"arguments\"".to_vec(),
                        value: args,
                        required: true,
                    },
                ],
                extra: None,
            });
            alts.push(call);
        }
        let call = match alts.len() {
            1 => alts[0],
            _ => g.push(Node::AnyOf(alts)),
        };
        g.root = g.push(Node::Calls {
            call,
            max: max_calls.max(1),
        });
        g.check_cycles()?;
        Ok(g)
    }

    fn push(&mut self, n: Node) -> NodeId {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    /// An `anyOf` that reaches itself without consuming input would expand forever.
    fn check_cycles(&self) -> Result<(), SchemaError> {
        for start in 0..self.nodes.len() {
            let mut seen = vec![false; self.nodes.len()];
            let mut todo = vec![start];
            while let Some(n) = todo.pop() {
                if let Node::AnyOf(alts) = &self.nodes[n] {
                    for &a in alts {
                        if a == start {
                            return Err(SchemaError {
                                path: String::new(),
                                message: "`$ref`/`anyOf` cycle that never reaches a value \
                                          is not supported"
                                    .into(),
                            });
                        }
                        if !seen[a] {
                            seen[a] = true;
                            todo.push(a);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

pub fn json_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

struct Compiler<'a> {
    g: &'a mut Grammar,
    root: &'a Value,
    /// `$ref` strings already given a node (so recursion terminates).
    refs: Vec<(String, NodeId)>,
}

fn err(path: &str, message: impl Into<String>) -> SchemaError {
    SchemaError {
        path: if path.is_empty() {
            "/".into()
        } else {
            path.into()
        },
        message: message.into(),
    }
}

fn count(v: &Value, path: &str, key: &str) -> Result<Option<u32>, SchemaError> {
    match v.get(key) {
        None => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n.min(u32::MAX as u64 - 1) as u32))
            .ok_or_else(|| {
                err(
                    &format!("{path}/{key}"),
                    format!("`{key}` must be a non-negative integer"),
                )
            }),
    }
}

impl Compiler<'_> {
    fn push(&mut self, n: Node) -> Result<NodeId, SchemaError> {
        if self.g.nodes.len() >= MAX_NODES {
            return Err(err(
                "",
                format!("schema too large (over {MAX_NODES} nodes)"),
            ));
        }
        Ok(self.g.push(n))
    }

    fn compile(&mut self, s: &Value, path: &str) -> Result<NodeId, SchemaError> {
        let obj = match s {
            Value::Bool(true) => return Ok(ANY),
            Value::Bool(false) => return Err(err(path, "the schema `false` matches nothing")),
            Value::Object(o) => o,
            _ => return Err(err(path, "a schema must be an object or a boolean")),
        };
        if let Some(r) = obj.get("$ref") {
            let r = r
                .as_str()
                .ok_or_else(|| err(path, "`$ref` must be a string"))?;
            if !only_annotations(obj, "$ref") {
                return Err(err(
                    path,
                    "`$ref` with sibling keywords (other than annotations) is not supported",
                ));
            }
            return self.reference(r, path);
        }
        const KNOWN: &[&str] = &[
            "type",
            "properties",
            "required",
            "additionalProperties",
            "items",
            "minItems",
            "maxItems",
            "minLength",
            "maxLength",
            "enum",
            "const",
            "anyOf",
            "allOf",
        ];
        for k in obj.keys() {
            if !KNOWN.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()) {
                return Err(err(
                    &format!("{path}/{k}"),
                    format!("JSON Schema keyword `{k}` is not supported"),
                ));
            }
        }
        if let Some(v) = obj.get("const") {
            return self.push(Node::Literal(vec![json_bytes(v)]));
        }
        if let Some(v) = obj.get("enum") {
            let vals = v
                .as_array()
                .filter(|a| !a.is_empty() && a.len() <= MAX_ENUM)
                .ok_or_else(|| {
                    err(
                        &format!("{path}/enum"),
                        format!("`enum` must be a list of 1 to {MAX_ENUM} values"),
                    )
                })?;
            return self.push(Node::Literal(vals.iter().map(json_bytes).collect()));
        }
        if let Some(all) = obj.get("allOf") {
            return match all.as_array().map(|a| a.as_slice()) {
                Some([one]) if obj.len() == 1 || only_annotations(obj, "allOf") => {
                    self.compile(one, &format!("{path}/allOf/0"))
                }
                _ => Err(err(
                    &format!("{path}/allOf"),
                    "`allOf` is supported only with one schema and no sibling keywords",
                )),
            };
        }
        if let Some(any) = obj.get("anyOf") {
            if !only_annotations(obj, "anyOf") {
                return Err(err(
                    &format!("{path}/anyOf"),
                    "`anyOf` with sibling keywords (other than annotations) is not supported",
                ));
            }
            let alts = any
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| err(&format!("{path}/anyOf"), "`anyOf` must be a non-empty list"))?;
            let mut ids = Vec::new();
            for (i, a) in alts.iter().enumerate() {
                ids.push(self.compile(a, &format!("{path}/anyOf/{i}"))?);
            }
            return if ids.len() == 1 {
                Ok(ids[0])
            } else {
                self.push(Node::AnyOf(ids))
            };
        }
        let types: Vec<&str> = match obj.get("type") {
            None => vec![],
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts
                .iter()
                .map(|t| {
                    t.as_str().ok_or_else(|| {
                        err(&format!("{path}/type"), "`type` entries must be strings")
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(err(
                    &format!("{path}/type"),
                    "`type` must be a string or a list",
                ))
            }
        };
        if types.is_empty() {
            // No type: infer from the keywords present, else any value.
            let has = |k: &str| obj.contains_key(k);
            if has("properties") || has("required") || has("additionalProperties") {
                return self.typed(obj, "object", path);
            }
            if has("items") || has("minItems") || has("maxItems") {
                return self.typed(obj, "array", path);
            }
            if has("minLength") || has("maxLength") {
                return self.typed(obj, "string", path);
            }
            return Ok(ANY);
        }
        let mut ids = Vec::new();
        for t in types {
            ids.push(self.typed(obj, t, path)?);
        }
        if ids.len() == 1 {
            Ok(ids[0])
        } else {
            self.push(Node::AnyOf(ids))
        }
    }

    fn typed(
        &mut self,
        obj: &serde_json::Map<String, Value>,
        t: &str,
        path: &str,
    ) -> Result<NodeId, SchemaError> {
        match t {
            "null" => self.push(Node::Null),
            "boolean" => self.push(Node::Bool),
            "number" => self.push(Node::Number { integer: false }),
            "integer" => self.push(Node::Number { integer: true }),
            "string" => {
                let v = Value::Object(obj.clone());
                let min = count(&v, path, "minLength")?.unwrap_or(0);
                let max = count(&v, path, "maxLength")?.unwrap_or(u32::MAX);
                if min > max {
                    return Err(err(path, "minLength is greater than maxLength"));
                }
                self.push(Node::String { min, max })
            }
            "array" => {
                let v = Value::Object(obj.clone());
                let min = count(&v, path, "minItems")?.unwrap_or(0);
                let max = count(&v, path, "maxItems")?.unwrap_or(u32::MAX);
                if min > max {
                    return Err(err(path, "minItems is greater than maxItems"));
                }
                let items = match obj.get("items") {
                    None => ANY,
                    Some(Value::Array(_)) => {
                        return Err(err(
                            &format!("{path}/items"),
                            "tuple `items` (a list of schemas) is not supported",
                        ))
                    }
                    Some(i) => self.compile(i, &format!("{path}/items"))?,
                };
                self.push(Node::Array { items, min, max })
            }
            "object" => self.object(obj, path),
            other => Err(err(
                &format!("{path}/type"),
                format!("unknown type `{other}`"),
            )),
        }
    }

    fn object(
        &mut self,
        obj: &serde_json::Map<String, Value>,
        path: &str,
    ) -> Result<NodeId, SchemaError> {
        let required: Vec<&str> = match obj.get("required") {
            None => vec![],
            Some(Value::Array(r)) => r
                .iter()
                .map(|x| {
                    x.as_str().ok_or_else(|| {
                        err(
                            &format!("{path}/required"),
                            "`required` entries must be strings",
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(err(
                    &format!("{path}/required"),
                    "`required` must be a list",
                ))
            }
        };
        let props = match obj.get("properties") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => {
                return Err(err(
                    &format!("{path}/properties"),
                    "`properties` must be an object",
                ))
            }
        };
        let additional = obj.get("additionalProperties");
        if let Some(a) = additional {
            if !a.is_boolean() && !a.is_object() {
                return Err(err(
                    &format!("{path}/additionalProperties"),
                    "`additionalProperties` must be a boolean or a schema",
                ));
            }
        }
        let declared = props.map(|p| p.len()).unwrap_or(0);
        for r in &required {
            if !props.is_some_and(|p| p.contains_key(*r)) {
                return Err(err(
                    &format!("{path}/required"),
                    format!("required property `{r}` is not declared in `properties` (free-form required keys are not supported)"),
                ));
            }
        }
        if declared == 0 {
            let extra = match additional {
                Some(Value::Bool(false)) => None,
                None | Some(Value::Bool(true)) => Some(ANY),
                Some(s) => Some(self.compile(s, &format!("{path}/additionalProperties"))?),
            };
            return match extra {
                Some(ANY) => Ok(ANY_OBJECT),
                extra => self.push(Node::Object {
                    props: vec![],
                    extra,
                }),
            };
        }
        let mut out = Vec::new();
        for (k, s) in props.into_iter().flatten() {
            let value = self.compile(s, &format!("{path}/properties/{k}"))?;
            out.push(Prop {
                key: json_bytes(&Value::from(k.as_str())),
                value,
                required: required.contains(&k.as_str()),
            });
        }
        self.push(Node::Object {
            props: out,
            extra: None,
        })
    }

    fn reference(&mut self, r: &str, path: &str) -> Result<NodeId, SchemaError> {
        if let Some(&(_, id)) = self.refs.iter().find(|(k, _)| k == r) {
            return Ok(id);
        }
        let target = if r == "#" {
            Some(self.root)
        } else if let Some(p) = r.strip_prefix('#') {
            self.root.pointer(p)
        } else {
            None
        };
        let Some(target) = target else {
            return Err(err(
                path,
                format!("`$ref` `{r}` is not supported (only local refs like `#/$defs/Name`)"),
            ));
        };
        // Reserve the node first so a recursive reference finds it.
        let slot = self.push(Node::AnyOf(vec![]))?;
        self.refs.push((r.to_string(), slot));
        let body = self.compile(target, r)?;
        self.g.nodes[slot] = Node::AnyOf(vec![body]);
        Ok(slot)
    }
}

fn only_annotations(obj: &serde_json::Map<String, Value>, except: &str) -> bool {
    obj.keys()
        .all(|k| k == except || ANNOTATIONS.contains(&k.as_str()))
}

#[cfg(test)]
mod tests;
