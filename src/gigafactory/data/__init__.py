"""The data factory: raw documents to deduplicated, tokenized, fixed-size token shards (`gigafactory data
prepare`), on local processes or Ray Data. The trainer reads the result through `gigafactory.train.data`.

This package also holds the built-in corpus (tinyshakespeare.txt, see README.md). It imports neither torch nor
the model: preparing data knows nothing about what will be trained on it."""
