"""callcredit server: the single-writer balance authority."""
