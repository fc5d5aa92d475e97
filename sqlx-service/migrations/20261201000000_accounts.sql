-- Accounts hold a balance in cents that can never go negative: the CHECK is what refuses an
-- overdraft, inside the transaction that attempted it.
CREATE TABLE accounts (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          TEXT   NOT NULL UNIQUE,
    balance_cents BIGINT NOT NULL CHECK (balance_cents >= 0)
);
