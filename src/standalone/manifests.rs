//! Reading the YAML a user would `kubectl apply`: `OAuthApplication`s and the Secrets they reference.
//! Every error names the file, the object and the field.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_yaml::Value;

use crate::api::v1alpha1::{API_VERSION, KIND, OAuthApplication};

pub const DEFAULT_NAMESPACE: &str = "default";

/// A manifest problem: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// `Kind namespace/name`, when the object could be identified.
    pub object: Option<String>,
    /// Dotted path of the field, when known.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

#[derive(Debug, Clone)]
pub struct SecretManifest {
    pub file: PathBuf,
    pub data: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct AppManifest {
    pub file: PathBuf,
    pub app: OAuthApplication,
}

impl AppManifest {
    pub fn namespace(&self) -> &str {
        self.app.metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }

    pub fn name(&self) -> &str {
        self.app.metadata.name.as_deref().unwrap_or_default()
    }

    pub fn object(&self) -> String {
        format!("{KIND} {}/{}", self.namespace(), self.name())
    }

    pub fn error(&self, field: impl Into<String>, message: impl Into<String>) -> ManifestError {
        ManifestError {
            file: self.file.clone(),
            object: Some(self.object()),
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

#[derive(Debug, Default)]
pub struct Manifests {
    pub apps: Vec<AppManifest>,
    /// By (namespace, name).
    pub secrets: HashMap<(String, String), SecretManifest>,
    /// ConfigMaps (their `data`), by (namespace, name): the offline key sets of trusted issuers.
    pub config_maps: HashMap<(String, String), SecretManifest>,
}

fn file_error(file: &Path, message: impl Into<String>) -> ManifestError {
    ManifestError { file: file.to_path_buf(), object: None, field: None, message: message.into() }
}

impl Manifests {
    /// Reads every `*.yaml` / `*.yml` file in `dir` (not recursive), in name order.
    pub fn load_dir(dir: &Path) -> Result<Self, ManifestError> {
        let entries = std::fs::read_dir(dir).map_err(|e| file_error(dir, format!("cannot read directory: {e}")))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        let mut manifests = Manifests::default();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| file_error(&file, format!("cannot read: {e}")))?;
            manifests.add_yaml(&file, &text)?;
        }
        Ok(manifests)
    }

    /// Adds the objects of one (multi-document) YAML file.
    pub fn add_yaml(&mut self, file: &Path, text: &str) -> Result<(), ManifestError> {
        for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = serde::Deserialize::deserialize(doc)
                .map_err(|e| file_error(file, format!("document {}: invalid YAML: {e}", index + 1)))?;
            self.add_object(file, index, value)?;
        }
        Ok(())
    }

    fn add_object(&mut self, file: &Path, index: usize, value: Value) -> Result<(), ManifestError> {
        if value.is_null() {
            return Ok(()); // an empty document, e.g. after a trailing `---`
        }
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let kind = text(&value, "kind").unwrap_or_default();
        let name = value.get("metadata").and_then(|m| text(m, "name"));
        let namespace =
            value.get("metadata").and_then(|m| text(m, "namespace")).unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        let object = format!("{kind} {namespace}/{}", name.as_deref().unwrap_or("?"));
        let err = |field: &str, message: String| ManifestError {
            file: file.to_path_buf(),
            object: Some(object.clone()),
            field: Some(field.to_string()),
            message,
        };
        let Some(name) = name else {
            return Err(err("metadata.name", format!("document {} has no metadata.name", index + 1)));
        };
        match kind.as_str() {
            KIND => {
                let api_version = text(&value, "apiVersion").unwrap_or_default();
                if api_version != API_VERSION {
                    return Err(err("apiVersion", format!("expected {API_VERSION}, found {api_version:?}")));
                }
                // The CRD types accept unknown fields (a newer CRD may add some); a manifest is checked strictly, so
                // a typo does not pass silently.
                let mut unknown = Vec::new();
                let mut note = |path: serde_ignored::Path<'_>| unknown.push(field_path(&path));
                let strict = serde_ignored::Deserializer::new(value, &mut note);
                let app: OAuthApplication = serde_path_to_error::deserialize(strict).map_err(|e| {
                    let path = e.path().to_string();
                    err(&path, e.into_inner().to_string())
                })?;
                // (apiVersion and kind were checked above; the generated type skips over them.)
                if let Some(field) = unknown.iter().find(|f| *f != "apiVersion" && *f != "kind") {
                    return Err(err(field, "unknown field (a typo?)".into()));
                }
                let manifest = AppManifest { file: file.to_path_buf(), app };
                if self.apps.iter().any(|a| a.namespace() == manifest.namespace() && a.name() == name) {
                    return Err(err("metadata.name", "defined twice".into()));
                }
                self.apps.push(manifest);
            }
            "Secret" => {
                let mut data = BTreeMap::new();
                if let Some(Value::Mapping(map)) = value.get("data") {
                    for (k, v) in map {
                        let key = k.as_str().unwrap_or_default().to_string();
                        let encoded = v.as_str().unwrap_or_default();
                        let decoded = STANDARD
                            .decode(encoded.split_whitespace().collect::<String>())
                            .map_err(|e| err(&format!("data.{key}"), format!("not valid base64: {e}")))?;
                        data.insert(key, decoded);
                    }
                }
                // stringData wins over data, as in the API server.
                strings(&value, "stringData", &mut data).map_err(|(field, message)| err(&field, message))?;
                self.secrets.insert((namespace, name), SecretManifest { file: file.to_path_buf(), data });
            }
            // Offline key sets of trusted issuers (`spec.trustedIssuers[].jwks.configMapRef`).
            "ConfigMap" => {
                let mut data = BTreeMap::new();
                strings(&value, "data", &mut data).map_err(|(field, message)| err(&field, message))?;
                self.config_maps.insert((namespace, name), SecretManifest { file: file.to_path_buf(), data });
            }
            other => {
                tracing::info!(file = %file.display(), kind = other, "ignoring an object of a kind kubetoken does not read")
            }
        }
        Ok(())
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<&SecretManifest> {
        self.secrets.get(&(namespace.to_string(), name.to_string()))
    }

    pub fn config_map(&self, namespace: &str, name: &str) -> Option<&SecretManifest> {
        self.config_maps.get(&(namespace.to_string(), name.to_string()))
    }
}

/// The string values of the mapping `field` of an object (a Secret's `stringData`, a ConfigMap's `data`) into `data`;
/// a value that is no string is an error naming its field.
fn strings(object: &Value, field: &str, data: &mut BTreeMap<String, Vec<u8>>) -> Result<(), (String, String)> {
    if let Some(Value::Mapping(map)) = object.get(field) {
        for (k, v) in map {
            let key = k.as_str().unwrap_or_default().to_string();
            let Some(s) = v.as_str() else {
                return Err((format!("{field}.{key}"), "must be a string".into()));
            };
            data.insert(key, s.as_bytes().to_vec());
        }
    }
    Ok(())
}

/// `spec.scopes[0].rolse`, in the notation of the other errors (serde_path_to_error's).
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<Manifests, ManifestError> {
        let mut m = Manifests::default();
        m.add_yaml(Path::new("apps.yaml"), yaml).map(|()| m)
    }

    #[test]
    fn reads_applications_and_secrets_from_multi_document_yaml() {
        let m = load(
            "apiVersion: kubetoken.io/v1alpha1\nkind: OAuthApplication\nmetadata: {name: shop}\nspec: {grantTypes: [client_credentials]}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: prod}\ndata: {a: aGVsbG8=}\nstringData: {b: world}\n---\n",
        )
        .expect("valid");
        assert_eq!(m.apps.len(), 1);
        assert_eq!(m.apps[0].namespace(), "default");
        let s = m.secret("prod", "s").expect("secret");
        assert_eq!(s.data["a"], b"hello");
        assert_eq!(s.data["b"], b"world");
    }

    /// A typo in a manifest must not pass silently, even though the CRD types accept unknown fields (so that an
    /// older controller keeps reading objects written for a newer CRD).
    #[test]
    fn an_unknown_field_in_a_manifest_is_an_error_naming_it() {
        let e = load(
            "apiVersion: kubetoken.io/v1alpha1\nkind: OAuthApplication\nmetadata: {name: shop}\nspec: {grantTypes: [client_credentials], scopes: [{name: a, rolse: [x]}]}\n",
        )
        .expect_err("a typo");
        assert_eq!(e.field.as_deref(), Some("spec.scopes[0].rolse"), "{e}");
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn errors_name_file_object_and_field() {
        let e = load("apiVersion: kubetoken.io/v1alpha1\nkind: OAuthApplication\nmetadata: {name: shop}\nspec: {tokenFormat: Paper}\n")
            .expect_err("invalid");
        assert_eq!(e.file, Path::new("apps.yaml"));
        assert_eq!(e.object.as_deref(), Some("OAuthApplication default/shop"));
        assert_eq!(e.field.as_deref(), Some("spec.tokenFormat"));
        let e = load("apiVersion: kubetoken.io/v1\nkind: OAuthApplication\nmetadata: {name: shop}\nspec: {}\n")
            .expect_err("version");
        assert_eq!(e.field.as_deref(), Some("apiVersion"));
        let e = load("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {a: '***'}\n").expect_err("base64");
        assert_eq!(e.field.as_deref(), Some("data.a"));
        assert!(load("a: [unclosed").is_err());
    }
}
