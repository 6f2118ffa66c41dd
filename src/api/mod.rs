//! The Kubernetes resources kubetoken reads, as users write them. One module per API version.
pub mod duration;
pub mod v1alpha1;
