"""Per-(model, dataset) configs: ``configs/<model>/<dataset>.py`` each expose ``get_config()`` with the official
hyperparameters (the schema and the loader live in :mod:`jaxprvr.config`: ``load_config("tvr")``)."""
