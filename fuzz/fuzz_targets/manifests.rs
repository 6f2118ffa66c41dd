//! The standalone manifest loader (`Manifests::add_yaml`) on arbitrary UTF-8: no panic, whatever the YAML.
#![no_main]

use std::path::Path;

use kubetoken::standalone::manifests::Manifests;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let mut manifests = Manifests::default();
    let _ = manifests.add_yaml(Path::new("fuzz.yaml"), text);
});
