"""Launchers that run the jaxjob trainer locally, on Cloud TPU VMs and on Kubernetes.

This package runs on the user's machine. It never imports `trainer` internals: it only
builds commands (argv lists) and manifests and runs the real `gcloud`/`kubectl`.
"""
