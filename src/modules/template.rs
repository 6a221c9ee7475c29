//! `require('cxTemplate')` (alias `template`): `compile(name, vars)` renders the template
//! `NAME.toml` from the `[templates] dir` folder into `{subject, text, html, sms}`. `cxSend`
//! uses the same renderer for `email({to, template, vars})`.
//!
//! A template file holds up to four parts as TOML strings; each is a MiniJinja template
//! (`{{ name }}`, `{% if %}`, `{% for %}`, filters). The `html` part escapes what it inserts.
//! Names stay inside the folder: no `..`, no absolute paths, no symlinks out.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::Deserialize;
use serde_json::{json, Value as Json};

use crate::script::{HostCall, HostError, HostMethod, HostModule, HostObject};

/// The parts a template file may have.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    subject: Option<String>,
    text: Option<String>,
    html: Option<String>,
    sms: Option<String>,
}

/// A rendered template; a part the file does not have is an empty string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
    pub sms: String,
}

impl Rendered {
    pub fn to_json(&self) -> Json {
        json!({"subject": self.subject, "text": self.text, "html": self.html, "sms": self.sms})
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "'{0}' is not a template name: use letters, digits, '_', '-', '.' and '/' between folders"
    )]
    BadName(String),
    #[error("no template '{name}': {path} does not exist")]
    Missing { name: String, path: String },
    #[error("template '{name}' resolves outside the templates folder")]
    Outside { name: String },
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} is not a template file (TOML with subject, text, html, sms): {message}")]
    Parse { path: String, message: String },
    #[error("template '{name}', part {part}: {message}")]
    Render {
        name: String,
        part: &'static str,
        message: String,
    },
}

/// The templates folder and the renderer's settings.
#[derive(Debug)]
pub struct Templates {
    dir: PathBuf,
}

/// `a/b-c.d` is a name; `..`, `.x`, empty segments and other characters are not.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        })
}

impl Templates {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Templates { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Read and render `name` with `vars` (blocking: file I/O).
    pub fn render_blocking(&self, name: &str, vars: &Json) -> Result<Rendered, TemplateError> {
        if !valid_name(name) {
            return Err(TemplateError::BadName(name.to_string()));
        }
        let path = self.dir.join(format!("{name}.toml"));
        let shown = path.display().to_string();
        let real = match path.canonicalize() {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TemplateError::Missing {
                    name: name.into(),
                    path: shown,
                })
            }
            Err(e) => {
                return Err(TemplateError::Read {
                    path: shown,
                    message: e.to_string(),
                })
            }
        };
        let root = self.dir.canonicalize().map_err(|e| TemplateError::Read {
            path: self.dir.display().to_string(),
            message: e.to_string(),
        })?;
        if !real.starts_with(&root) {
            return Err(TemplateError::Outside { name: name.into() });
        }
        let source = std::fs::read_to_string(&real).map_err(|e| TemplateError::Read {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let file: TemplateFile = toml::from_str(&source).map_err(|e| TemplateError::Parse {
            path: shown,
            message: e.message().to_string(),
        })?;
        render(name, &file, vars)
    }

    /// [`Self::render_blocking`] on tokio's blocking pool.
    pub async fn render(
        self: &Arc<Self>,
        name: String,
        vars: Json,
    ) -> Result<Rendered, TemplateError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.render_blocking(&name, &vars))
            .await
            .unwrap_or_else(|e| {
                Err(TemplateError::Read {
                    path: String::new(),
                    message: e.to_string(),
                })
            })
    }
}

fn render(name: &str, file: &TemplateFile, vars: &Json) -> Result<Rendered, TemplateError> {
    let mut env = Environment::new();
    // A missing variable renders empty (what mail-merge users expect); a typo in a filter or
    // tag still fails with the template's name, part and line.
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_auto_escape_callback(|part| {
        if part.ends_with(".html") {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    let ctx = minijinja::Value::from_serialize(vars);
    let part = |part: &'static str, source: &Option<String>| -> Result<String, TemplateError> {
        let Some(source) = source else {
            return Ok(String::new());
        };
        env.render_named_str(&format!("{name}.{part}"), source, &ctx)
            .map_err(|e| TemplateError::Render {
                name: name.to_string(),
                part,
                message: match e.line() {
                    Some(line) => format!("line {line}: {}", e.detail().unwrap_or(&e.to_string())),
                    None => e.to_string(),
                },
            })
    };
    Ok(Rendered {
        subject: part("subject", &file.subject)?,
        text: part("text", &file.text)?,
        html: part("html", &file.html)?,
        sms: part("sms", &file.sms)?,
    })
}

pub(crate) fn template_error(e: TemplateError) -> HostError {
    HostError::new("TemplateError", format!("cxTemplate: {e}"))
}

const METHODS: &[HostMethod] = &[HostMethod::asynchronous("compile")];

/// `require('cxTemplate')`.
pub struct TemplateModule {
    templates: Arc<Templates>,
}

impl TemplateModule {
    pub fn new(templates: Arc<Templates>) -> Self {
        TemplateModule { templates }
    }
}

impl HostModule for TemplateModule {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(TemplateObject {
            templates: self.templates.clone(),
        })
    }
}

struct TemplateObject {
    templates: Arc<Templates>,
}

impl HostObject for TemplateObject {
    fn methods(&self) -> &[HostMethod] {
        METHODS
    }
    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        if method != "compile" {
            return HostCall::Ready(Err(HostError::type_error(format!(
                "cxTemplate has no method '{method}'"
            ))));
        }
        let name = match super::args::string("cxTemplate.compile", &args, 0, "name") {
            Ok(n) => n,
            Err(e) => return HostCall::Ready(Err(e)),
        };
        let vars = match args.get(1) {
            None | Some(Json::Null) => json!({}),
            Some(v @ Json::Object(_)) => v.clone(),
            Some(_) => {
                return HostCall::Ready(Err(HostError::type_error(
                    "cxTemplate.compile: argument 2 (vars) must be an object",
                )))
            }
        };
        let templates = self.templates.clone();
        HostCall::Pending(Box::pin(async move {
            templates
                .render(name, vars)
                .await
                .map(|r| r.to_json())
                .map_err(template_error)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn parts_render_with_vars_and_html_is_escaped() {
        let dir = folder(&[(
            "alerts/low.toml",
            "subject = \"Low balance for {{ name }}\"\n\
             text = \"{% for n in numbers %}{{ n }};{% endfor %}\"\n\
             html = \"<p>{{ name }}</p>\"\n",
        )]);
        let t = Templates::new(dir.path());
        let r = t
            .render_blocking(
                "alerts/low",
                &json!({"name": "Jo <admin>", "numbers": [1, 2]}),
            )
            .unwrap();
        assert_eq!(r.subject, "Low balance for Jo <admin>");
        assert_eq!(r.text, "1;2;");
        assert_eq!(r.html, "<p>Jo &lt;admin&gt;</p>");
        assert_eq!(r.sms, "");
    }

    #[test]
    fn bad_names_missing_files_and_bad_syntax_are_named_errors() {
        let outside = folder(&[("secret.toml", "text = \"s\"")]);
        let dir = folder(&[
            ("broken.toml", "text = \"{% if %}\""),
            ("odd.toml", "body = 1"),
        ]);
        std::os::unix::fs::symlink(
            outside.path().join("secret.toml"),
            dir.path().join("link.toml"),
        )
        .unwrap();
        let t = Templates::new(dir.path());
        let err = |name: &str| t.render_blocking(name, &json!({})).unwrap_err();
        assert!(matches!(err("../x"), TemplateError::BadName(_)));
        assert!(matches!(err("/etc/passwd"), TemplateError::BadName(_)));
        assert!(matches!(err("nope"), TemplateError::Missing { .. }));
        assert!(matches!(err("link"), TemplateError::Outside { .. }));
        assert!(matches!(err("odd"), TemplateError::Parse { .. }));
        let e = err("broken");
        assert!(
            matches!(e, TemplateError::Render { part: "text", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("line 1"), "{e}");
    }
}
