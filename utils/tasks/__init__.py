"""Chapter 5's applications, one small module per task.

``metrics`` (accuracy, F1, entity F1, SQuAD EM/F1, BLEU, ROUGE), ``encoders`` (calling and
pooling an encoder, fine-tuning its top layers on cached states), ``classification``, ``ner``,
``qa``, ``translation``, ``summarization``, ``text_generation``, ``multimodal`` (a tiny CLIP)
and ``serving`` (padding, latency and throughput).
"""
