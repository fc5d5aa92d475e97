-- An order is paid from its account in the transaction that records it.
CREATE TABLE orders (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  BIGINT NOT NULL REFERENCES accounts (id),
    item        TEXT   NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents > 0)
);

CREATE INDEX orders_account_id ON orders (account_id);
