"""Deployment descriptions for a generated repository: Kubernetes manifests (``k8s``) and the
small subset of kustomize (``kustomize``) needed to render them offline."""
