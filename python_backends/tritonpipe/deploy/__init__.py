"""Deployment descriptions for a generated repository: Kubernetes manifests, entered through
``k8s`` (what ``tritonpipe generate --k8s`` calls)."""
