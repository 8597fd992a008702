"""editlab: fast text-guided image editing with diffusion models; one namespace for every module."""
