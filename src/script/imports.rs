//! What `import ... from NAME` and `require(NAME)` reach beyond the built-ins: host modules
//! under their names (`cxKV`, `kv`...), and other scripts of the scripts folder (`./lib`),
//! resolved inside that folder only.
//!
//! Every runtime gets the resolver and loader below. A host module's ES module and a script
//! imported as a module are bytecode compiled once (at registration, or by the library when
//! the file changes) and only *loaded* into the run that imports them, so a run that imports
//! nothing pays nothing.

use rquickjs::{
    loader::{ImportAttributes, Loader, Resolver},
    module::Declared,
    Ctx, Exception, Module, Runtime,
};

use super::{compile::ImportAs, host::HostModules, library::valid_name};

/// What an import specifier names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A registered host module, by the name it was registered under.
    Host(String),
    /// A script of the scripts folder, by its name (no `.js`).
    Script(String),
}

/// The suffix that marks a resolved module name as a script of the folder: host module names
/// never end with it, so `import './kv'` (the script) and `import 'kv'` (the module) differ.
const SCRIPT_SUFFIX: &str = ".js";

/// Classify `spec` as a host module or a script of the folder, or say why it is neither.
///
/// `./name` (with or without `.js`) is always a script; a bare name is a host module when one
/// is registered under it, else a script of that name when the folder has one (ConnexCS's
/// older `require('get_customer_record')`). Anything that leaves the folder (`../x`,
/// `/etc/x`, `./a/b`) is refused.
pub(crate) fn classify(modules: &HostModules, spec: &str) -> Result<Target, String> {
    if modules.entry(spec).is_some() {
        return Ok(Target::Host(spec.to_string()));
    }
    let escapes = |why: &str| {
        format!(
            "'{spec}' {why}: scripts import other scripts of the scripts folder only, as './name'"
        )
    };
    if let Some(rest) = spec.strip_prefix("./") {
        let stem = rest.strip_suffix(SCRIPT_SUFFIX).unwrap_or(rest);
        if stem.contains('/') || stem.contains('\\') || stem.starts_with('.') {
            return Err(escapes("leaves the scripts folder"));
        }
        if !valid_name(stem) {
            return Err(escapes("is not a valid script name"));
        }
        return match modules.scripts() {
            Some(_) => Ok(Target::Script(stem.to_string())),
            None => Err(format!(
                "'{spec}': this run has no scripts folder to import from"
            )),
        };
    }
    if spec.starts_with('/') || spec.starts_with("../") || spec.contains('/') {
        return Err(escapes("is a path"));
    }
    let stem = spec.strip_suffix(SCRIPT_SUFFIX).unwrap_or(spec);
    if let Some(library) = modules.scripts() {
        if valid_name(stem) && library.has(stem) {
            return Ok(Target::Script(stem.to_string()));
        }
    }
    Err(format!(
        "no such module '{spec}'; modules: {}; other scripts of the scripts folder: './name'",
        modules.names().join(", ")
    ))
}

/// The resolver and loader of every runtime the sandbox creates.
#[derive(Clone)]
pub(crate) struct Imports {
    modules: HostModules,
}

impl Imports {
    pub(crate) fn install(rt: &Runtime, modules: &HostModules) {
        let imports = Imports {
            modules: modules.clone(),
        };
        rt.set_loader(imports.clone(), imports);
    }
}

impl Resolver for Imports {
    fn resolve<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        _base: &str,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<String> {
        match classify(&self.modules, name) {
            Ok(Target::Host(name)) => Ok(name),
            Ok(Target::Script(stem)) => Ok(format!("{stem}{SCRIPT_SUFFIX}")),
            Err(message) => Err(Exception::throw_type(ctx, &format!("import {message}"))),
        }
    }
}

impl Loader for Imports {
    fn load<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> rquickjs::Result<Module<'js, Declared>> {
        let compiled = match name.strip_suffix(SCRIPT_SUFFIX) {
            Some(stem) => {
                let Some(library) = self.modules.scripts() else {
                    return Err(Exception::throw_type(
                        ctx,
                        &format!("import '{name}': no scripts folder"),
                    ));
                };
                library
                    .get_import(stem, name, ImportAs::Module)
                    .map_err(|e| Exception::throw_syntax(ctx, &format!("import './{stem}': {e}")))?
            }
            None => match self.modules.entry(name).and_then(|r| r.es_module.clone()) {
                Some(Ok(module)) => module,
                Some(Err(e)) => {
                    return Err(Exception::throw_internal(
                        ctx,
                        &format!("import '{name}': the module does not compile: {e}"),
                    ))
                }
                None => {
                    return Err(Exception::throw_type(
                        ctx,
                        &format!("import '{name}': no such module"),
                    ))
                }
            },
        };
        // SAFETY: the bytes are our own compiler's output (see `compile.rs`).
        unsafe { Module::load(ctx.clone(), &compiled.bytecode) }
    }
}
