-- The online-store reference schema for docker-compose.yml.
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE);
CREATE TABLE inventory (sku text PRIMARY KEY, title text, in_stock int NOT NULL, price numeric(10,2));
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers, status text NOT NULL DEFAULT 'placed',
                     total numeric(10,2), placed_at timestamptz NOT NULL DEFAULT now());
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE TABLE order_items (order_id int REFERENCES orders, line int, sku text REFERENCES inventory, qty int,
                          PRIMARY KEY (order_id, line));
INSERT INTO inventory VALUES ('TEA-01', 'Sencha 100g', 40, 7.50), ('MUG-02', 'Stoneware mug', 12, 14.00);
-- A least-privilege role for tidemark: replication, and reading the published tables.
CREATE ROLE tidemark LOGIN REPLICATION PASSWORD 'tidemark';
GRANT SELECT ON ALL TABLES IN SCHEMA public TO tidemark;
CREATE PUBLICATION tidemark_store FOR TABLE customers, inventory, orders, order_items;
-- The read models' database.
CREATE DATABASE readmodels;
\connect readmodels
CREATE TABLE customer_orders (customer_id int PRIMARY KEY, orders int NOT NULL, spent numeric NOT NULL);
