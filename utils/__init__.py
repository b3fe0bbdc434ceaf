"""PyTorch components of the course *Transformers and Large Language Models*.

One module per idea; the chapters and labs import them from here. See CONTRIBUTING.md.
"""
