//! The token endpoint's form parser (`Form::parse`) on arbitrary bodies: no panic, and every non-empty parameter
//! of an accepted body is kept under its name with its value.
#![no_main]

use kubetoken::http::form::Form;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(form) = Form::parse(data) else { return };
    for (name, value) in form_urlencoded::parse(data) {
        if !value.is_empty() {
            assert_eq!(form.get(&name), Some(&*value), "parameter {name:?}");
        }
    }
});
