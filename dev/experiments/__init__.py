"""One-off harnesses of experiments (kernels, levers): see README.md. Never imported by the product."""
