"""The site's side: the Flower ClientApp and its handlers (client_app), the site's data, model and
state (site), the policy and ledger guard (guard), SecAgg+ (secure_mod), alignment queries
(alignment) and the replay of a repeated training request (retry)."""
