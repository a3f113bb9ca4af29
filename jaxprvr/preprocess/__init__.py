"""Offline feature extraction for the datasets the models read (optional extras; heavy packages imported lazily).

* :mod:`jaxprvr.preprocess.vmr`: MRNet's query features, DistilBERT text and wav2vec2 speech, one ``<stem>.pt``
  per query (``pip install 'jaxprvr[vmr-preprocess]'``).
"""
