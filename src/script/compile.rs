//! Compiling script source to QuickJS bytecode once, so every run only loads bytecode.
//!
//! Compilation happens in a per-thread "compiler" context that has the `Eval` intrinsic;
//! run contexts do not, which is what makes `eval` and `new Function` unavailable to scripts.

use std::{cell::RefCell, ffi::CString, fmt::Write as _};

use rquickjs::{
    context::intrinsic, module::WriteOptions, qjs, Context, Ctx, Module, Runtime, Value,
};
use sha2::{Digest, Sha256};

use super::{error::CompileError, exception::describe_exception};

/// Whether the source is a classic script (global `main`, `module.exports`) or an ES module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Global,
    Module,
}

/// Driver entry points ScriptForge DID drivers export.
pub const DRIVER_FUNCTIONS: [&str; 4] = ["search", "allocate", "release", "list"];

/// A script ready to run: bytecode plus what the engine needs to know without running it.
#[derive(Debug)]
pub struct CompiledScript {
    /// The script's name (file name without `.js`).
    pub name: String,
    /// Content hash of the source (hex), exposed as `process.env.SCRIPTFORGE_ID`.
    pub id: String,
    pub kind: SourceKind,
    pub bytecode: Vec<u8>,
    /// The source exports driver functions (`module.exports = {search, ...}` or ES exports).
    pub is_driver: bool,
    /// The source reads the input as the object `vars` (`vars.routing`, `vars["x"]`): only
    /// then does a run copy the input's keys onto `vars` (see `install_run_globals`).
    pub reads_vars_object: bool,
}

/// The content hash used for caching and `SCRIPTFORGE_ID`.
pub fn content_id(source: &str) -> String {
    let digest = Sha256::digest(source.as_bytes());
    hex::encode(&digest[..12])
}

thread_local! {
    static COMPILER: RefCell<Option<(Runtime, Context)>> = const { RefCell::new(None) };
}

/// Compile `source` (named `name` in error positions) to bytecode.
pub fn compile(name: &str, source: &str) -> Result<CompiledScript, CompileError> {
    let kind = detect_kind(source);
    let bytecode = COMPILER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(new_compiler().map_err(|e| CompileError {
                name: name.to_string(),
                line: 0,
                column: 0,
                message: format!("cannot start the compiler: {e}"),
            })?);
        }
        let (_, context) = slot.as_ref().expect("compiler initialised above");
        context.with(|ctx| match kind {
            SourceKind::Global => match compile_global(&ctx, name, source) {
                Err(e) if e.message.contains("export") || e.message.contains("import") => {
                    compile_module(&ctx, name, source)
                        .map(|b| (SourceKind::Module, b))
                        .map_err(|_| e)
                }
                other => other.map(|b| (SourceKind::Global, b)),
            },
            SourceKind::Module => compile_module(&ctx, name, source).map(|b| (kind, b)),
        })
    })?;
    let (kind, bytecode) = bytecode;
    Ok(CompiledScript {
        name: name.to_string(),
        id: content_id(source),
        kind,
        bytecode,
        is_driver: detect_driver(source),
        reads_vars_object: detect_vars_object(source),
    })
}

fn detect_vars_object(source: &str) -> bool {
    static PATTERN: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = PATTERN.get_or_init(|| {
        regex::Regex::new(r"(^|[^\w$.])vars\s*(\?\.|\.|\[)").expect("static regex")
    });
    re.is_match(source)
}

fn new_compiler() -> rquickjs::Result<(Runtime, Context)> {
    let rt = Runtime::new()?;
    // Source is attacker-controlled too: a pathological script must not exhaust the host.
    rt.set_memory_limit(256 * 1024 * 1024);
    rt.set_max_stack_size(1024 * 1024);
    let ctx = Context::custom::<(intrinsic::Eval, intrinsic::RegExpCompiler)>(&rt)?;
    Ok((rt, ctx))
}

/// ES modules are recognised by a top-level `import` or `export` statement at a line start;
/// a classic script that fails on those keywords is retried as a module (see `compile`).
fn detect_kind(source: &str) -> SourceKind {
    static PATTERN: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = PATTERN.get_or_init(|| {
        regex::Regex::new(r#"(?m)^\s*(export\s*[\w{*]|import\s*[\w{*'"])"#).expect("static regex")
    });
    if re.is_match(source) {
        SourceKind::Module
    } else {
        SourceKind::Global
    }
}

fn detect_driver(source: &str) -> bool {
    static PATTERN: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = PATTERN.get_or_init(|| {
        regex::Regex::new(
            r"(?m)\bmodule\.exports?\s*=|^\s*export\s+(async\s+)?function\s*\*?\s*(search|allocate|release|list)\b|^\s*export\s*\{[^}]*\b(search|allocate|release|list)\b|^\s*export\s+(const|let|var)\s+(search|allocate|release|list)\b",
        )
        .expect("static regex")
    });
    re.is_match(source)
}

fn compile_global(ctx: &Ctx<'_>, name: &str, source: &str) -> Result<Vec<u8>, CompileError> {
    let src = CString::new(source).map_err(|e| CompileError {
        name: name.to_string(),
        line: 0,
        column: 0,
        message: format!("source contains a NUL byte at offset {}", e.nul_position()),
    })?;
    let file = CString::new(name).unwrap_or_else(|_| c"script".into());
    let flags = (qjs::JS_EVAL_TYPE_GLOBAL | qjs::JS_EVAL_FLAG_COMPILE_ONLY) as i32;
    // SAFETY: the context is locked by `with`; `src` is NUL-terminated as JS_Eval requires;
    // the returned value is owned and handed to `Value::from_raw`, which frees it.
    let func = unsafe {
        let raw = qjs::JS_Eval(
            ctx.as_raw().as_ptr(),
            src.as_ptr(),
            source.len() as _,
            file.as_ptr(),
            flags,
        );
        Value::from_raw(ctx.clone(), raw)
    };
    if func.is_exception() {
        return Err(syntax_error(ctx, name));
    }
    write_bytecode(ctx, &func).map_err(|message| CompileError {
        name: name.to_string(),
        line: 0,
        column: 0,
        message,
    })
}

fn write_bytecode(ctx: &Ctx<'_>, value: &Value<'_>) -> Result<Vec<u8>, String> {
    let mut len = 0;
    // SAFETY: JS_WriteObject returns a js_malloc'd buffer of `len` bytes (or NULL), which we
    // copy and release with js_free on the same context.
    unsafe {
        let ptr = qjs::JS_WriteObject(
            ctx.as_raw().as_ptr(),
            &mut len,
            value.as_raw(),
            qjs::JS_WRITE_OBJ_BYTECODE as i32,
        );
        if ptr.is_null() {
            let _ = ctx.catch();
            return Err("cannot serialise bytecode".into());
        }
        let bytes = std::slice::from_raw_parts(ptr, len as usize).to_vec();
        qjs::js_free(ctx.as_raw().as_ptr(), ptr.cast());
        Ok(bytes)
    }
}

fn compile_module(ctx: &Ctx<'_>, name: &str, source: &str) -> Result<Vec<u8>, CompileError> {
    let declared =
        Module::declare(ctx.clone(), name, source).map_err(|_| syntax_error(ctx, name))?;
    declared
        .write(WriteOptions::default())
        .map_err(|e| CompileError {
            name: name.to_string(),
            line: 0,
            column: 0,
            message: format!("cannot serialise module bytecode: {e}"),
        })
}

fn syntax_error(ctx: &Ctx<'_>, name: &str) -> CompileError {
    let thrown = ctx.catch();
    let described = describe_exception(&thrown);
    let (line, column) = described
        .location_in(name)
        .unwrap_or((described.line.unwrap_or(0), 0));
    let mut message = described.text;
    if message.is_empty() {
        let _ = write!(message, "syntax error");
    }
    CompileError {
        name: name.to_string(),
        line,
        column,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_scripts_and_modules_are_told_apart() {
        assert_eq!(
            detect_kind("function main(d){ return d }"),
            SourceKind::Global
        );
        assert_eq!(
            detect_kind("export function main(d){ return d }"),
            SourceKind::Module
        );
        assert_eq!(
            detect_kind("export default async function (d) {}"),
            SourceKind::Module
        );
    }

    #[test]
    fn reading_vars_as_an_object_is_recognised() {
        for yes in [
            "vars.routing.cli",
            "x = vars['a']",
            "vars .a",
            "return vars?.x",
        ] {
            assert!(detect_vars_object(yes), "{yes}");
        }
        for no in [
            "var data = vars(); exit(data)",
            "myvars.x",
            "data.vars.x",
            "$vars.x",
        ] {
            assert!(!detect_vars_object(no), "{no}");
        }
    }

    #[test]
    fn drivers_are_recognised_in_every_export_form() {
        assert!(detect_driver("module.exports = { search, allocate }"));
        assert!(detect_driver("module.export = { search }"));
        assert!(detect_driver("export async function search(q) {}"));
        assert!(detect_driver("function list(){}\nexport { list }"));
        assert!(!detect_driver("function main(data) { return data }"));
        assert!(!detect_driver("export function main(data) { return data }"));
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let err = compile("broken", "function main(data) {\n  return data +;\n}\n").unwrap_err();
        assert_eq!(err.line, 2, "{err}");
        assert!(err.column > 0, "{err}");
        assert!(err.to_string().starts_with("broken:2:"), "{err}");
        let err = compile("mod", "export function main() {\n\n  let = ;\n}").unwrap_err();
        assert_eq!(err.line, 3, "{err}");
    }

    #[test]
    fn same_source_same_id_and_bytecode_is_produced() {
        let a = compile("a", "function main(){ return 1 }").unwrap();
        let b = compile("b", "function main(){ return 1 }").unwrap();
        assert_eq!(a.id, b.id);
        assert!(!a.bytecode.is_empty());
        assert_ne!(a.id, content_id("function main(){ return 2 }"));
    }
}
