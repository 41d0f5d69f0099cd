"""``jobs.bench``: like-for-like step and epoch timing against a bare PyTorch loop, start-up
phases, the printed tables, and the GPU check."""
