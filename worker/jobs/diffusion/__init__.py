"""The Stable Diffusion family: ``text_to_image``, ``inpainting`` and ``style_transfer`` share one package.

``spec.py`` (no torch) declares the three types and their model kinds; ``run.py`` holds the job
bodies; ``pipeline.py`` (one family of components per base model), ``lora.py`` and
``ip_adapter.py`` are the model code; ``demo.py`` builds the tiny offline models.
"""
