"""Token-indexed tables: where rows live (`store`), how they modulate a layer (`mixers`:
JTok, Eq 7-9; JTok-M, Eq 10-13) and how they are optimised (`row_adam`).

The model asks for rows; it never imports training, parallel, run or CLI code.
"""
