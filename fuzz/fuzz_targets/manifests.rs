//! The standalone manifest loader (`Manifests::add_yaml`) on arbitrary UTF-8, and the checks every application read
//! goes through (`validate`, the trusted issuers and their offline key sets): no panic, whatever the YAML.
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use kubetoken::standalone::manifests::Manifests;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let mut manifests = Manifests::default();
    let _ = manifests.add_yaml(Path::new("fuzz.yaml"), text);
    for app in &manifests.apps {
        let _ = app.app.spec.validate();
        // Each offline key set read from the manifests' ConfigMaps, as standalone mode reads them.
        let key_sets: HashMap<_, _> = app
            .app
            .spec
            .key_set_config_maps()
            .map(|r| {
                let json = manifests
                    .config_map(app.namespace(), &r.name)
                    .and_then(|cm| cm.data.get(r.key()))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                ((r.name.clone(), r.key().to_string()), kubetoken::api::v1alpha1::parse_key_set(&json))
            })
            .collect();
        let _ = app.app.spec.trusted_issuers(&key_sets, true);
    }
});
