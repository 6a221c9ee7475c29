//! The text `console.log` writes for its arguments, close to Node's `util.inspect`.
//!
//! Strings given directly print as they are; everything else is inspected: `Error`s as their
//! `name: message` and stack, objects as `{ a: 1, b: 'x' }`, arrays as `[ 1, 2 ]`, nested
//! beyond depth 2 as `[Object]` / `[Array]`, cycles as `[Circular]`, functions as
//! `[Function: name]`. A value longer than a line (72 columns) is broken over lines indented
//! by two spaces. Where we are simpler than Node (documented in docs/compat/modules-core.md):
//! getters are called rather than shown as `[Getter]`, symbol keys are left out, long arrays
//! are not grouped into columns, and nested errors print as `[Name: message]`.

use std::fmt::Write as _;

use rquickjs::{function::This, Array, Function, Object, Value};

/// Node's default `depth`: objects nested deeper print as `[Object]`.
const MAX_DEPTH: usize = 2;
/// Array items and Map/Set entries shown before `... N more items`.
const MAX_ITEMS: usize = 100;
/// Text beyond this is not produced at all (the log line is cut at 8 KiB anyway).
const MAX_OUTPUT: usize = 16 * 1024;
/// Node's `breakLength` (80) minus room for the surrounding text.
const LINE: usize = 72;

/// The line `console.log(...args)` writes: a first string argument may hold `%s`, `%d`,
/// `%i`, `%f`, `%j`, `%o`, `%O` and `%%`, as in Node; the rest are joined with spaces.
pub fn console_text<'js>(args: &[Value<'js>]) -> String {
    let mut parts = Vec::with_capacity(args.len());
    let mut rest = args;
    if let Some((first, tail)) = args.split_first() {
        if let Some(format) = first.as_string().and_then(|s| s.to_string().ok()) {
            rest = tail;
            let mut out = String::with_capacity(format.len());
            let mut chars = format.chars().peekable();
            while let Some(c) = chars.next() {
                if c != '%' {
                    out.push(c);
                    continue;
                }
                match chars.peek().copied() {
                    Some('%') => {
                        chars.next();
                        out.push('%');
                    }
                    Some(spec @ ('s' | 'd' | 'i' | 'f' | 'j' | 'o' | 'O' | 'c')) => {
                        let Some((arg, tail)) = rest.split_first() else {
                            out.push('%');
                            continue;
                        };
                        chars.next();
                        rest = tail;
                        out.push_str(&format_spec(spec, arg));
                    }
                    _ => out.push('%'),
                }
            }
            parts.push(out);
        }
    }
    for arg in rest {
        match arg.as_string().and_then(|s| s.to_string().ok()) {
            Some(s) => parts.push(s),
            None => parts.push(inspect(arg)),
        }
    }
    parts.join(" ")
}

fn format_spec(spec: char, arg: &Value<'_>) -> String {
    match spec {
        's' => match arg.as_string().and_then(|s| s.to_string().ok()) {
            Some(s) => s,
            None => inspect(arg),
        },
        'd' | 'i' => {
            let n = arg
                .get::<rquickjs::Coerced<f64>>()
                .map(|c| c.0)
                .unwrap_or(f64::NAN);
            let n = if spec == 'i' { n.trunc() } else { n };
            number_text(n)
        }
        'f' => number_text(
            arg.get::<rquickjs::Coerced<f64>>()
                .map(|c| c.0)
                .unwrap_or(f64::NAN),
        ),
        'j' => arg
            .ctx()
            .json_stringify(arg.clone())
            .ok()
            .flatten()
            .and_then(|s| s.to_string().ok())
            .unwrap_or_else(|| "undefined".into()),
        'c' => String::new(),
        _ => inspect(arg),
    }
}

/// `util.inspect(value)`, roughly.
pub fn inspect(value: &Value<'_>) -> String {
    let mut inspector = Inspector {
        seen: Vec::new(),
        produced: 0,
    };
    inspector.value(value, 0, 0)
}

struct Inspector<'js> {
    /// The objects being printed, outermost first: meeting one again is a cycle.
    seen: Vec<Object<'js>>,
    produced: usize,
}

fn number_text(n: f64) -> String {
    if n == 0.0 && n.is_sign_negative() {
        return "-0".into();
    }
    if n.is_nan() {
        return "NaN".into();
    }
    if n.is_infinite() {
        return if n > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if n.fract() == 0.0 && n.abs() < 1e21 {
        return format!("{n:.0}");
    }
    format!("{n}")
}

/// A string inside a structure: quoted as Node quotes it.
fn quoted(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\\' => out.push_str("\\\\"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn key_text(key: &str) -> String {
    let mut chars = key.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$');
    if plain {
        key.to_string()
    } else {
        quoted(key)
    }
}

fn string_prop(object: &Object<'_>, key: &str) -> Option<String> {
    object
        .get::<_, Option<rquickjs::Coerced<String>>>(key)
        .ok()
        .flatten()
        .map(|c| c.0)
}

/// `Object.prototype.toString.call(value)`'s tag: `Date`, `RegExp`, `Map`, `Set`...
fn tag_of<'js>(object: &Object<'js>) -> Option<String> {
    let ctx = object.ctx();
    let to_string: Function = ctx
        .globals()
        .get::<_, Object>("Object")
        .ok()?
        .get::<_, Object>("prototype")
        .ok()?
        .get("toString")
        .ok()?;
    let text: String = to_string.call((This(object.clone()),)).ok()?;
    text.strip_prefix("[object ")?
        .strip_suffix(']')
        .map(str::to_string)
}

fn call_method<'js>(object: &Object<'js>, name: &str) -> Option<Value<'js>> {
    let f: Function = object.get(name).ok()?;
    f.call((This(object.clone()),)).ok()
}

impl<'js> Inspector<'js> {
    fn value(&mut self, value: &Value<'js>, depth: usize, indent: usize) -> String {
        if self.produced > MAX_OUTPUT {
            return "…".into();
        }
        let text = self.value_inner(value, depth, indent);
        self.produced += text.len();
        text
    }

    fn value_inner(&mut self, value: &Value<'js>, depth: usize, indent: usize) -> String {
        if let Some(s) = value.as_string() {
            return quoted(&s.to_string().unwrap_or_default());
        }
        if value.is_undefined() {
            return "undefined".into();
        }
        if value.is_null() {
            return "null".into();
        }
        if let Some(b) = value.as_bool() {
            return b.to_string();
        }
        if let Some(n) = value.as_number() {
            return number_text(n);
        }
        if let Some(symbol) = value.as_symbol() {
            let description = symbol
                .description()
                .ok()
                .and_then(|d| d.as_string().and_then(|s| s.to_string().ok()))
                .unwrap_or_default();
            return format!("Symbol({description})");
        }
        if value.as_big_int().is_some() {
            let text = value
                .get::<rquickjs::Coerced<String>>()
                .map(|c| c.0)
                .unwrap_or_default();
            return format!("{text}n");
        }
        let Some(object) = value.as_object() else {
            return format!("<{}>", value.type_name());
        };
        if let Some(f) = value.as_function() {
            let name = f
                .as_object()
                .and_then(|o| string_prop(o, "name"))
                .unwrap_or_default();
            return if name.is_empty() {
                "[Function (anonymous)]".into()
            } else {
                format!("[Function: {name}]")
            };
        }
        if object.is_error() {
            return self.error(object, depth, indent);
        }
        if self.seen.iter().any(|o| o == object) {
            return "[Circular]".into();
        }
        let tag = tag_of(object);
        match tag.as_deref() {
            Some("Date") => {
                let iso = object
                    .get::<_, Function>("toISOString")
                    .ok()
                    .and_then(|f| f.call::<_, String>((This(object.clone()),)).ok());
                return iso.unwrap_or_else(|| "Invalid Date".into());
            }
            Some("RegExp") => {
                return call_method(object, "toString")
                    .and_then(|v| v.as_string().and_then(|s| s.to_string().ok()))
                    .unwrap_or_else(|| "/(?:)/".into());
            }
            _ => {}
        }
        if let Some(promise) = value.as_promise() {
            use rquickjs::promise::PromiseState;
            return match promise.state() {
                PromiseState::Pending => "Promise { <pending> }".into(),
                PromiseState::Resolved => {
                    let v = promise
                        .result::<Value>()
                        .and_then(Result::ok)
                        .unwrap_or_else(|| Value::new_undefined(object.ctx().clone()));
                    format!("Promise {{ {} }}", self.value(&v, depth + 1, indent + 2))
                }
                PromiseState::Rejected => "Promise { <rejected> }".into(),
            };
        }
        let is_array = value.is_array();
        if depth > MAX_DEPTH {
            return if is_array {
                "[Array]".into()
            } else {
                match constructor_name(object).as_deref() {
                    None | Some("Object") => "[Object]".into(),
                    Some(name) => format!("[{name}]"),
                }
            };
        }
        self.seen.push(object.clone());
        let text = match (is_array, tag.as_deref()) {
            (true, _) => self.array(object, depth, indent),
            (false, Some(kind @ ("Map" | "Set"))) => self.collection(object, kind, depth, indent),
            _ => self.object(object, depth, indent),
        };
        self.seen.pop();
        text
    }

    fn error(&mut self, error: &Object<'js>, depth: usize, indent: usize) -> String {
        let name = string_prop(error, "name").unwrap_or_else(|| "Error".into());
        let message = string_prop(error, "message").unwrap_or_default();
        let head = if message.is_empty() {
            name
        } else {
            format!("{name}: {message}")
        };
        if depth > 0 {
            return format!("[{head}]");
        }
        let stack = string_prop(error, "stack").unwrap_or_default();
        let mut text = head;
        let stack = stack.trim_end();
        if !stack.is_empty() {
            text.push('\n');
            text.push_str(stack);
        }
        // Own enumerable properties (a `code`, say) follow, as Node shows them.
        let extra: Vec<String> = error
            .keys::<String>()
            .filter_map(Result::ok)
            .filter(|k| !matches!(k.as_str(), "stack" | "message" | "name"))
            .map(|k| {
                let v: Value = error
                    .get(k.as_str())
                    .unwrap_or_else(|_| Value::new_undefined(error.ctx().clone()));
                format!(
                    "{}: {}",
                    key_text(&k),
                    self.value(&v, depth + 1, indent + 2)
                )
            })
            .collect();
        if !extra.is_empty() {
            text.push(' ');
            text.push_str(&wrap("{", &extra, "}", indent));
        }
        text
    }

    fn array(&mut self, array: &Object<'js>, depth: usize, indent: usize) -> String {
        let Some(array) = array.as_array() else {
            return "[]".into();
        };
        let len = array.len();
        let mut items = Vec::with_capacity(len.min(MAX_ITEMS) + 1);
        for i in 0..len.min(MAX_ITEMS) {
            let v: Value = array
                .get(i)
                .unwrap_or_else(|_| Value::new_undefined(array.ctx().clone()));
            items.push(self.value(&v, depth + 1, indent + 2));
        }
        if len > MAX_ITEMS {
            items.push(format!("... {} more items", len - MAX_ITEMS));
        }
        extras(self, array.as_object(), len, &mut items, depth, indent);
        wrap("[", &items, "]", indent)
    }

    fn collection(
        &mut self,
        object: &Object<'js>,
        kind: &str,
        depth: usize,
        indent: usize,
    ) -> String {
        let ctx = object.ctx().clone();
        let entries: Option<Array> = ctx
            .globals()
            .get::<_, Object>("Array")
            .ok()
            .and_then(|a| a.get::<_, Function>("from").ok())
            .and_then(|from| from.call((object.clone(),)).ok());
        let entries = entries.map(|a| a.into_iter().filter_map(Result::ok).collect::<Vec<Value>>());
        let entries = entries.unwrap_or_default();
        let mut items = Vec::new();
        for entry in entries.iter().take(MAX_ITEMS) {
            if kind == "Map" {
                let pair = entry.as_array();
                let k: Value = pair
                    .and_then(|p| p.get(0).ok())
                    .unwrap_or_else(|| Value::new_undefined(ctx.clone()));
                let v: Value = pair
                    .and_then(|p| p.get(1).ok())
                    .unwrap_or_else(|| Value::new_undefined(ctx.clone()));
                let k = self.value(&k, depth + 1, indent + 2);
                let v = self.value(&v, depth + 1, indent + 2);
                items.push(format!("{k} => {v}"));
            } else {
                items.push(self.value(entry, depth + 1, indent + 2));
            }
        }
        if entries.len() > MAX_ITEMS {
            items.push(format!("... {} more items", entries.len() - MAX_ITEMS));
        }
        wrap(
            &format!("{kind}({}) {{", entries.len()),
            &items,
            "}",
            indent,
        )
    }

    fn object(&mut self, object: &Object<'js>, depth: usize, indent: usize) -> String {
        let mut items = Vec::new();
        for key in object.keys::<String>().filter_map(Result::ok) {
            if items.len() >= MAX_ITEMS * 10 || self.produced > MAX_OUTPUT {
                items.push("…".into());
                break;
            }
            let v: Value = object
                .get(key.as_str())
                .unwrap_or_else(|_| Value::new_undefined(object.ctx().clone()));
            let text = self.value(&v, depth + 1, indent + 2);
            items.push(format!("{}: {text}", key_text(&key)));
        }
        let open = match constructor_name(object).as_deref() {
            None => "[Object: null prototype] {".to_string(),
            Some("Object") => "{".to_string(),
            Some(name) => format!("{name} {{"),
        };
        if items.is_empty() {
            return format!("{}}}", open);
        }
        wrap(&open, &items, "}", indent)
    }
}

/// Non-index properties of an array (`arr.total = 3`), as Node shows them after the items.
fn extras<'js>(
    inspector: &mut Inspector<'js>,
    object: &Object<'js>,
    len: usize,
    items: &mut Vec<String>,
    depth: usize,
    indent: usize,
) {
    for key in object.keys::<String>().filter_map(Result::ok) {
        if key.parse::<usize>().is_ok_and(|i| i < len) {
            continue;
        }
        let v: Value = object
            .get(key.as_str())
            .unwrap_or_else(|_| Value::new_undefined(object.ctx().clone()));
        let text = inspector.value(&v, depth + 1, indent + 2);
        items.push(format!("{}: {text}", key_text(&key)));
    }
}

/// The name of the object's constructor; `None` for a null prototype.
fn constructor_name(object: &Object<'_>) -> Option<String> {
    let proto = object.get_prototype()?;
    let constructor: Option<Object> = proto.get("constructor").ok().flatten();
    Some(
        constructor
            .and_then(|c| string_prop(&c, "name"))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "Object".into()),
    )
}

/// `open item, item close` on one line when it fits, else one item per line.
fn wrap(open: &str, items: &[String], close: &str, indent: usize) -> String {
    if items.is_empty() {
        return format!("{open}{close}");
    }
    let total: usize = items.iter().map(|i| i.len() + 2).sum::<usize>() + open.len() + close.len();
    if total + indent <= LINE && !items.iter().any(|i| i.contains('\n')) {
        return format!("{open} {} {close}", items.join(", "));
    }
    let pad = " ".repeat(indent + 2);
    let mut out = String::from(open);
    for (i, item) in items.iter().enumerate() {
        out.push('\n');
        out.push_str(&pad);
        out.push_str(item);
        if i + 1 < items.len() {
            out.push(',');
        }
    }
    out.push('\n');
    out.push_str(&" ".repeat(indent));
    out.push_str(close);
    out
}
