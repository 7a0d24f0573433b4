"""Prompt analysis (paper sec. 3.3.1, Table 2, Figs. 3, 4, 8): how far apart are the prompts of two
communities? Sentence-BERT embeddings of the first words of English prompts, Ward clusters, and the KL
divergence between the datasets' cluster distributions with bootstrap intervals."""
